"""Per-node command lines of a multi-node launch: pure functions, no Ray, no processes.

One :class:`NodeContext` describes a node once the placement is known (its rank, node 0's
address and the rendezvous port). From it:

* :func:`build_sglang_argv` -- ``python -m sglang_xshare.launch_server <user SGLang flags>
  --nnodes N --node-rank R --dist-init-addr IP:PORT --tp-size T [--ep-size E] <--xshare-* flags>``;
* :func:`render_command` -- a user ``--command`` template with ``{node_rank}``, ``{nnodes}``,
  ``{master_addr}``, ``{master_port}``, ... filled in, run through ``/bin/sh -c``;
* :func:`node_env` -- the environment added on every node (``--env KEY=VAL`` plus the
  ``SGLANG_XSHARE_*`` rank variables);
* :func:`format_shell` -- the exact line ``--dry-run`` prints.

Bad flags raise :class:`~sglang_xshare.config.XShareConfigError` naming the flag.
"""

from __future__ import annotations

import shlex
import string
from dataclasses import dataclass
from typing import Mapping, Sequence

from sglang_xshare.config import XShareConfigError

__all__ = [
    "LAUNCHER_SET_FLAGS",
    "NodeContext",
    "LAUNCH_SERVER_MODULE",
    "PLACEHOLDERS",
    "find_flag",
    "check_no_launcher_flags",
    "build_sglang_argv",
    "render_command",
    "parse_env_pairs",
    "node_env",
    "health_url",
    "format_shell",
]

#: The module every node runs in server mode.
LAUNCH_SERVER_MODULE = "sglang_xshare.launch_server"

#: SGLang flags the launcher sets itself (all spellings SGLang's ``ServerArgs`` accepts).
_LAUNCHER_SET = {
    "--nnodes": "--nnodes",
    "--node-rank": "--node-rank",
    "--dist-init-addr": "--dist-init-addr",
    "--nccl-init-addr": "--dist-init-addr",
    "--tp-size": "--tp-size",
    "--tensor-parallel-size": "--tp-size",
    "--ep-size": "--ep-size",
    "--expert-parallel-size": "--ep-size",
    "--ep": "--ep-size",
}

#: Every spelling of the SGLang flags the launcher sets itself.
LAUNCHER_SET_FLAGS = tuple(_LAUNCHER_SET)

#: Placeholders a ``--command`` template may use, with what they stand for.
PLACEHOLDERS: dict[str, str] = {
    "node_rank": "rank of this node, 0..nnodes-1 (node 0 holds the rendezvous)",
    "nnodes": "number of nodes",
    "master_addr": "IP address of node 0",
    "master_port": "free TCP port picked on node 0",
    "dist_init_addr": "master_addr:master_port",
    "node_ip": "IP address of this node",
    "gpus_per_node": "accelerators reserved on each node (--gpus-per-node)",
    "python": "the Python interpreter of the Ray worker on this node",
}


@dataclass(frozen=True)
class NodeContext:
    """Where one node sits in the launch, known once the placement group is ready."""

    node_rank: int
    nnodes: int
    master_addr: str
    master_port: int
    node_ip: str
    gpus_per_node: int
    python: str

    @property
    def dist_init_addr(self) -> str:
        """``IP:PORT`` of node 0 (IPv6 in brackets)."""
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"{host}:{self.master_port}"

    def placeholders(self) -> dict[str, str]:
        """Values for :data:`PLACEHOLDERS`, as strings."""
        return {
            "node_rank": str(self.node_rank),
            "nnodes": str(self.nnodes),
            "master_addr": self.master_addr,
            "master_port": str(self.master_port),
            "dist_init_addr": self.dist_init_addr,
            "node_ip": self.node_ip,
            "gpus_per_node": str(self.gpus_per_node),
            "python": self.python,
        }


def _flag_name(token: str) -> str:
    return token.split("=", 1)[0]


def find_flag(args: Sequence[str], names: Sequence[str]) -> str | None:
    """Value of the last occurrence of any of ``names`` (``--x v`` or ``--x=v``), else ``None``."""
    value: str | None = None
    for i, tok in enumerate(args):
        name = _flag_name(tok)
        if name in names:
            if "=" in tok:
                value = tok.split("=", 1)[1]
            elif i + 1 < len(args):
                value = args[i + 1]
    return value


def _as_sglang_reads(name: str) -> str:
    """The launcher flag SGLang's parser takes ``name`` for (argparse's ``allow_abbrev``: ``--tp``
    is ``--tp-size``, ``--node-r`` is ``--node-rank``), else ``name``. A prefix of exactly one of
    the launcher's flags is read as that flag (no SGLang import here: the launcher stays light;
    ``tests/test_ray_launcher.py`` checks against SGLang's own parser that no SGLang option is such
    a prefix, so nothing SGLang takes as another option is refused)."""
    if name in _LAUNCHER_SET or len(name) < 4:
        return name
    hits = {o for o in _LAUNCHER_SET if o.startswith(name)}
    return hits.pop() if len(hits) == 1 else name


def check_no_launcher_flags(sglang_flags: Sequence[str]) -> None:
    """Refuse SGLang flags the launcher computes itself (they would contradict its own), also as
    the abbreviations SGLang's parser accepts (``--tp 2``, ``--node-r 1``)."""
    for tok in sglang_flags:
        if not tok.startswith("--"):
            continue
        typed = _flag_name(tok)
        name = _as_sglang_reads(typed)
        if name in _LAUNCHER_SET:
            own = _LAUNCHER_SET[name]
            if own in ("--tp-size", "--ep-size"):
                hint = f"pass {own} to sglang-xshare-ray itself (before the SGLang flags)"
            else:
                hint = "the launcher sets it from the placement group"
            alias = "" if typed == name else f" (SGLang reads it as {name})"
            raise XShareConfigError(typed, f"is set by sglang-xshare-ray for every node{alias}; {hint}")


def build_sglang_argv(
    ctx: NodeContext,
    sglang_flags: Sequence[str],
    xshare_flags: Sequence[str],
    *,
    tp_size: int,
    ep_size: int | None,
) -> list[str]:
    """The argv node ``ctx.node_rank`` runs in server mode.

    Adds ``--host 0.0.0.0`` when the user gave no ``--host`` so node 0's HTTP server is
    reachable from the launcher (SGLang's default is loopback).
    """
    check_no_launcher_flags(sglang_flags)
    argv = [ctx.python, "-m", LAUNCH_SERVER_MODULE, *sglang_flags]
    if find_flag(sglang_flags, ["--host"]) is None:
        argv += ["--host", "0.0.0.0"]
    argv += [
        "--nnodes", str(ctx.nnodes),
        "--node-rank", str(ctx.node_rank),
        "--dist-init-addr", ctx.dist_init_addr,
        "--tp-size", str(tp_size),
    ]
    if ep_size is not None:
        argv += ["--ep-size", str(ep_size)]
    argv += list(xshare_flags)
    return argv


def render_command(template: str, ctx: NodeContext, flag: str = "--command") -> str:
    """Fill ``{placeholder}`` fields of a template (``{{``/``}}`` for literal braces).

    ``flag`` names the flag the template came from in error messages.
    """
    values = ctx.placeholders()
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise XShareConfigError(flag, f"bad braces in {template!r}: {e} (write {{{{ and }}}} for literal braces)") from e
    for f in fields:
        if f not in values:
            known = ", ".join("{" + k + "}" for k in PLACEHOLDERS)
            raise XShareConfigError(
                flag, f"unknown placeholder {{{f}}} in {template!r}; known: {known} (write {{{{ }}}} for literal braces)"
            )
    return template.format_map(values)


def parse_env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """``["KEY=VAL", ...]`` from repeated ``--env`` flags into a dict (later wins)."""
    env: dict[str, str] = {}
    for p in pairs:
        key, sep, val = p.partition("=")
        if not sep or not key or not (key[0].isalpha() or key[0] == "_") or not all(c.isalnum() or c == "_" for c in key):
            raise XShareConfigError("--env", f"expected KEY=VALUE with KEY a shell variable name, got {p!r}")
        env[key] = val
    return env


def node_env(ctx: NodeContext, user_env: Mapping[str, str]) -> dict[str, str]:
    """Variables added to the node's environment (on top of the Ray worker's own).

    ``SGLANG_XSHARE_NODE_RANK``, ``SGLANG_XSHARE_NNODES``, ``SGLANG_XSHARE_MASTER_ADDR``,
    ``SGLANG_XSHARE_MASTER_PORT`` and ``PYTHONUNBUFFERED=1`` (so logs stream line by line),
    then the user's ``--env`` pairs, which win.
    """
    env = {
        "SGLANG_XSHARE_NODE_RANK": str(ctx.node_rank),
        "SGLANG_XSHARE_NNODES": str(ctx.nnodes),
        "SGLANG_XSHARE_MASTER_ADDR": ctx.master_addr,
        "SGLANG_XSHARE_MASTER_PORT": str(ctx.master_port),
        "PYTHONUNBUFFERED": "1",
    }
    env.update(user_env)
    return env


def health_url(head_ip: str, sglang_flags: Sequence[str]) -> str:
    """``http://HOST:PORT/health`` of node 0's server, from the user's ``--host``/``--port``."""
    host = find_flag(sglang_flags, ["--host"])
    port = find_flag(sglang_flags, ["--port"]) or "30000"
    if host in (None, "", "0.0.0.0", "::"):
        host = head_ip
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/health"


def format_shell(argv: Sequence[str], env: Mapping[str, str], cwd: str | None) -> str:
    """One copy-pasteable shell line: ``cd CWD && env K=V ... argv``."""
    parts: list[str] = []
    if cwd:
        parts += ["cd", shlex.quote(cwd), "&&"]
    if env:
        parts.append("env")
        parts += [shlex.quote(f"{k}={v}") for k, v in env.items()]
    parts.append(shlex.join(argv))
    return " ".join(parts)
