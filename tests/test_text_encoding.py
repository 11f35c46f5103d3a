"""Text files are read and written as UTF-8 whatever the machine's locale.

CI machines may run with an ASCII locale (``LANG`` unset, UTF-8 mode off), where Python's default text encoding is
ASCII: a log line with "→" or a datalist with "é" then fails to read. So every text-mode ``open``,
``read_text``/``write_text`` and ``subprocess`` call with ``text=True`` in the repository names its encoding, and
``bundle.io.atomic_write`` defaults text modes to UTF-8.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("bundle", "scripts", "tests")
BINARY_OPENERS = {"tarfile", "zipfile", "Image", "gzip", "h5py", "tifffile", "np", "os", "nib", "itk"}


def _text_call(call: ast.Call) -> str | None:
    """The name of a text-mode I/O call without ``encoding=``, else None."""
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
    keywords = {k.arg: k.value for k in call.keywords}
    if "encoding" in keywords:
        return None
    if name in ("read_text", "write_text"):
        return name
    text_flag = keywords.get("text", keywords.get("universal_newlines"))
    if name in ("run", "Popen", "check_output", "check_call") and getattr(text_flag, "value", None) is True:
        return f"subprocess.{name}(text=True)"
    if name == "open":
        if isinstance(f, ast.Attribute) and getattr(f.value, "id", None) in BINARY_OPENERS:
            return None
        mode_arg = call.args[0] if isinstance(f, ast.Attribute) else (call.args[1] if len(call.args) > 1 else None)
        mode = keywords.get("mode", mode_arg)
        if mode is None or (isinstance(mode, ast.Constant) and "b" not in mode.value):
            return "open (text mode)"
    return None


def unnamed_encodings(root: Path = REPO) -> list[str]:
    """``file:line: call`` for each text-mode I/O call under ``FOLDERS`` that leaves the encoding to the locale."""
    found = []
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and (what := _text_call(node)):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {what}")
    return found


def test_every_text_io_call_names_its_encoding():
    assert unnamed_encodings() == []


def test_the_check_finds_calls_that_leave_the_encoding_to_the_locale(tmp_path):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "m.py").write_text(
        "import subprocess\nfrom pathlib import Path\n"
        "Path('a').read_text()\nopen('a')\nopen('a', 'rb')\nopen('a', 'w', encoding='utf-8')\n"
        "subprocess.run(['x'], text=True)\nsubprocess.run(['x'], capture_output=True)\n",
        encoding="utf-8",
    )
    assert unnamed_encodings(tmp_path) == [
        "bundle/m.py:3: read_text",
        "bundle/m.py:4: open (text mode)",
        "bundle/m.py:7: subprocess.run(text=True)",
    ]


def test_atomic_text_writes_and_reads_are_utf8_under_an_ascii_locale(tmp_path):
    """Under ``LC_ALL=C`` with UTF-8 mode off, a JSON file and a text file with non-ASCII content round-trip."""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    code = (  # non-ASCII as escapes: an ASCII locale cannot pass it on the command line
        "import json, locale, sys\n"
        "from bundle.io import atomic_write, save_json\n"
        "assert locale.getpreferredencoding(False).lower() not in ('utf-8', 'utf8'), locale.getpreferredencoding()\n"
        "save_json({'label': '\\u00e9pith\\u00e9lium \\u2192 tumour'}, sys.argv[1] + '/a.json')\n"
        "with atomic_write(sys.argv[1] + '/b.txt', 'w') as f:\n"
        "    f.write('Dice \\u00b1 sd')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, cwd=REPO)
    assert json.loads((tmp_path / "a.json").read_text(encoding="utf-8")) == {"label": "épithélium → tumour"}
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "Dice ± sd"
