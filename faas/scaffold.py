"""`faas new NAME`: a function folder to start from, served and tested as it is.

The folder holds the function's file, which declares one `@function` on the bundled
backbone with one of the example functions' adapters (so `faas up --functions NAME` serves
it at once), and `tests/test_<NAME>.py`, which starts a node on the folder and calls the
function through NATS. The test sits in a subfolder because a node imports every `*.py`
file of its functions folder, and `faas deploy` ships them all.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from string import Template

from faas.protocol import valid_function_name

_FUNCTION = Template('''"""$name: a LoRA function.

Serve it:  faas up --functions $folder
Call it:   faas invoke $name '{"prompt": "hi"}'       (--stream: the text as it is generated)
Test it:   pytest $folder/tests
"""

from faas import BadRequest, function
from faas.bundled import adapter_path, model_path

# The bundled backbone (SmolLM2-135M-Instruct, or a tiny random model where it could not be
# fetched) and the adapter of the example `support` function, so that this serves as it is.
# Your own adapter: a peft LoRA folder trained on the backbone, holding adapter_config.json
# and adapter_model.safetensors (what faas loads; pickled .bin weights are refused). Put it
# beside this file and write adapter="adapter" (relative paths are resolved from this
# file's folder). Your own backbone: backbone="/path/to/model", a transformers model folder.
@function(name="$name", backbone=model_path(), adapter=adapter_path("support"), timeout_s=60)
def handler(event: dict, ctx) -> dict:
    prompt = event.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("the event needs a non-empty 'prompt'")  # the caller gets a 400
    # The backbone's chat template: instruct models answer best to the prompt they were
    # tuned on. stream=True sends the text to callers that ask for a stream as it comes.
    r = ctx.generate(ctx.chat_prompt([{"role": "user", "content": prompt}]),
                     max_new_tokens=64, stream=True)
    return {"text": r.text, "finish_reason": r.finish_reason}
''')

_TEST = Template('''"""$name, end to end: a real node (`faas up`, with its own NATS server) serves this
folder and the tests call the function through NATS, as any producer would.

Run:  pytest $folder/tests
"""

import asyncio
import importlib.util
from pathlib import Path

import pytest

from faas import BadRequest, Client
from faas.localnode import LocalNode

FOLDER = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    # Its own NATS server and state, beside any node you run yourself. Its first start may
    # build the bundled models (fetching and converting SmolLM2): give it time.
    running = LocalNode(FOLDER, state_dir=tmp_path_factory.mktemp("nats"))
    running.start(ready_timeout_s=600)
    yield running
    running.stop()


def invoke(node, event: dict):
    async def call():
        async with Client(node.url) as client:
            return await client.invoke("$name", event, timeout_s=120)

    return asyncio.run(call())


def test_answers_a_prompt(node):
    output = invoke(node, {"prompt": "hi"}).output
    # Yours: what the function must answer to the prompts it is for.
    assert isinstance(output["text"], str)
    assert output["finish_reason"] in ("stop", "length")


def test_refuses_an_event_without_a_prompt(node):
    with pytest.raises(BadRequest, match="non-empty 'prompt'"):
        invoke(node, {})
''')


def create(name: str, parent: Path) -> list[Path]:
    """Write the function folder `parent/name` (making `parent` if needed) and return the
    files written. Raises ValueError for a name that is not a function name (the SDK's
    rule) or a folder that exists."""
    if not valid_function_name(name):
        raise ValueError(f"invalid function name {name!r}: use lower-case letters, digits, '_' "
                         "and '-', starting with a letter (at most 63 characters)")
    module = name.replace("-", "_")  # importable, unless the name is a keyword
    if importlib.util.find_spec(module) is not None:
        # The node puts the folder first on sys.path: NAME.py would replace that module.
        raise ValueError(f"{module!r} is the name of an installed module ({module}.py would "
                         "shadow it): choose another name")
    folder = parent / name
    try:
        folder.mkdir(parents=True)  # fails on anything already there, also a link
    except FileExistsError:
        raise ValueError(f"{folder} exists: faas new only writes a new folder") from None
    fields = {"name": name, "folder": str(folder)}
    files = {folder / f"{module}.py": _FUNCTION.substitute(fields),
             folder / "tests" / f"test_{module}.py": _TEST.substitute(fields)}
    (folder / "tests").mkdir()
    for path, text in files.items():
        path.write_text(text)
    return list(files)
