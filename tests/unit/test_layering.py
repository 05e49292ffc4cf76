"""The layers stay layers: sans-IO code loads no driver, drivers form no cycle.

``dtx/wire`` (codecs) and ``dtx/proto`` (sans-IO machines) import no
asyncio, socket, clock or OS randomness, and importing them loads no
asyncio; the drivers in ``dtx/aio`` import each other without a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SANS_IO = sorted([*(ROOT / "dtx" / "wire").glob("*.py"), *(ROOT / "dtx" / "proto").glob("*.py")])
FORBIDDEN_MODULES = {"asyncio", "socket", "time", "selectors", "threading"}


def assert_runs(code: str) -> None:
    """``code`` runs without an error in a fresh interpreter (nothing loaded yet)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def imports_of(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) for every import in ``path`` (name None for ``import m``)."""
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            out.extend((base, alias.name) for alias in node.names)
    return out


@pytest.mark.parametrize("path", SANS_IO, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_sans_io_modules_import_no_io(path: Path) -> None:
    bad = []
    for module, name in imports_of(path):
        top = module.lstrip(".").split(".")[0]
        if top in FORBIDDEN_MODULES and not module.startswith("."):
            bad.append(module)
        if top == "os" and (name in (None, "urandom")):
            bad.append(f"{module} {name or ''}".strip())
        if module.startswith(".") and module.lstrip(".").startswith("aio") \
                or module.startswith("dtx.aio"):
            bad.append(module)
    source = path.read_text()
    assert "os.urandom" not in source and "time.time(" not in source
    assert not bad, f"{path.name} imports {bad}"


def test_importing_the_sans_io_layer_loads_no_asyncio() -> None:
    code = ("import sys, dtx.wire.demux, dtx.proto.session, dtx.proto.endpoint, "
            "dtx.proto.traversal, dtx.wire.control, dtx.wire.stun\n"
            "loaded = sorted(m for m in sys.modules if m == 'asyncio' or m.startswith('dtx.aio'))\n"
            "assert not loaded, loaded\n")
    assert_runs(code)


def test_the_public_api_still_loads_the_driver_on_use() -> None:
    code = ("import sys, dtx\n"
            "assert 'dtx.aio.peer' not in sys.modules\n"
            "assert dtx.Peer.__module__ == 'dtx.aio.peer'\n"
            "assert dtx.Session.__module__ == 'dtx.aio.session'\n")
    assert_runs(code)


def test_the_command_line_loads_no_xmpp_client_until_a_command_needs_it() -> None:
    """``dtx send`` without ``--xmpp`` pays nothing for slixmpp (a one-shot
    command's start-up is part of its latency), nor for uvloop until the
    loop starts, and ``dtx.xmpp``'s names still load it on use."""
    code = ("import sys, dtx.cli, dtx.xmpp\n"
            "loaded = sorted(m for m, mod in sys.modules.items() if mod is not None and"
            " (m.split('.')[0] in ('slixmpp', 'aiodns', 'uvloop')"
            " or m in ('dtx.xmpp.client', 'dtx.aio.portmap', 'dtx.aio.upnp')))\n"
            "assert not loaded, loaded\n"
            "assert dtx.xmpp.XmppClient.__module__ == 'dtx.xmpp.client'\n")
    assert_runs(code)


def test_the_command_lines_load_uvloop_only_to_start_the_loop() -> None:
    """Parsing ``--loop uvloop`` (which checks it is installed) imports
    nothing of it, for ``dtx`` and the rendezvous server alike; it is
    imported by ``dtx.aio.loop.run``, once the command runs."""
    code = ("import sys, dtx.cli, rendezvous.__main__ as rdv\n"
            "dtx.cli.build_parser().parse_args(['--loop', 'auto', 'pin', 'list'])\n"
            "rdv.build_parser().parse_args(['--loop', 'auto'])\n"
            "from dtx.aio.loop import uvloop_missing\n"
            "if uvloop_missing() is None:\n"
            "    dtx.cli.build_parser().parse_args(['--loop', 'uvloop', 'pin', 'list'])\n"
            "loaded = sorted(m for m, mod in sys.modules.items()"
            " if mod is not None and m.split('.')[0] == 'uvloop')\n"
            "assert not loaded, loaded\n")
    assert_runs(code)


def test_a_device_starts_before_the_quic_engine_loads_and_loads_it_meanwhile() -> None:
    """A one-shot ``dtx send`` opens its socket and registers before any of
    aioquic (or X.509) is loaded: ``dtx.cli`` and the asyncio peer import
    none of it. A started peer loads it in a background thread while its
    first datagrams travel, and a module read while that thread imports it
    is the one, fully loaded module (the thread's import, not a second)."""
    code = (
        "import sys, asyncio, dtx.cli, dtx.aio.peer as peer_module\n"
        "engine = ('aioquic.quic.connection', 'aioquic.tls', 'aioquic.quic.packet',"
        " 'cryptography.x509', 'dtx.proto.session', 'dtx.proto.auth')\n"
        "def real(m):\n"
        "    mod = sys.modules.get(m)\n"
        "    return mod is not None and type(mod).__name__ != '_Deferred'\n"
        "loaded = [m for m in engine if real(m)]\n"
        "assert not loaded, loaded\n"
        "from dtx import _lazy\n"
        "from dtx.identity import generate_identity\n"
        "from dtx.trust import StaticKeys, Verifier, PinStore\n"
        "me = generate_identity('tv@example.org/living-room')\n"
        "async def main():\n"
        "    p = peer_module.Peer(me, Verifier([StaticKeys({})], PinStore(None)),\n"
        "                         config=peer_module.PeerConfig(rendezvous=('127.0.0.1', 9)))\n"
        "    await p.start('127.0.0.1', 0, listen=False)\n"
        "    threads = [t for t in __import__('threading').enumerate() if t.name == 'dtx-import']\n"
        "    assert threads, 'no background import'\n"
        "    from dtx.proto import session\n"
        "    assert session.XmlSession.__module__ == 'dtx.proto.session'\n"
        "    threads[0].join(60)\n"
        "    assert all(real(m) for m in engine), [m for m in engine if not real(m)]\n"
        "    assert sys.modules['dtx.proto.session'].XmlSession is session.XmlSession\n"
        "    assert _lazy.deferred() == ['service_identity'], _lazy.deferred()\n"
        "    await p.close()\n"
        "asyncio.run(main())\n")
    assert_runs(code)


def test_no_import_cycle_among_the_drivers() -> None:
    aio = ROOT / "dtx" / "aio"
    names = {p.stem for p in aio.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in names:
        deps = set()
        for module, imported in imports_of(aio / f"{name}.py"):
            if module == ".":
                target = imported or ""
            elif module.startswith(".") and not module.startswith(".."):
                target = module[1:].split(".")[0]
            elif module.startswith("dtx.aio."):
                target = module.split(".")[2]
            else:
                continue
            if target in names:
                deps.add(target)
        graph[name] = deps

    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> None:
        if node in done:
            return
        assert node not in visiting, f"import cycle: {' -> '.join(visiting + [node])}"
        visiting.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        visiting.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
