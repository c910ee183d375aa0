"""``sglang-xshare-ray`` passes the user's SGLang flags through unchanged (no cluster, no Ray).

Each node's command line, read by SGLang's own parser (``ServerArgs.add_cli_args``), must give
exactly what the user's flags plus the launcher's own (``--nnodes``, ``--node-rank``,
``--dist-init-addr``, ``--tp-size``, ``--ep-size``) give: ``--host`` and ``--port`` as typed
(the launcher adds ``--host 0.0.0.0`` only when none is given), ``--model-path``, booleans,
``--flag=value`` spellings, values with spaces, flags before and after ``--``.
"""

from __future__ import annotations

import argparse

import pytest

from sglang_xshare.launch.args import node_commands, parse_args, planned_contexts

IPS = ("10.1.0.1", "10.1.0.2")
LAUNCHER = ["--nnodes", "2", "--gpus-per-node", "2", "--tp-size", "4", "--ep-size", "2", "--dry-run",
            "--node-ips", ",".join(IPS), "--master-port", "5000"]
BEFORE = ["--model-path", "/models/m", "--trust-remote-code"]  # unknown to the launcher: passed on
AFTER = ["--host", "10.1.0.1", "--port", "31001", "--mem-fraction-static", "0.71", "--context-length=4096",
         "--served-model-name", "my model", "--moe-a2a-backend", "deepep", "--chunked-prefill-size", "2048",
         "--log-level", "debug", "--enable-metrics", "--dp-size", "2", "--enable-dp-attention"]
XSHARE = ["--xshare-policy", "xshare", "--xshare-budget", "0.6"]


@pytest.fixture(scope="module")
def sglang_parser() -> argparse.ArgumentParser:
    from sglang.srt.server_args import ServerArgs

    p = argparse.ArgumentParser()
    ServerArgs.add_cli_args(p)
    return p


def _node_argvs(user: list[str]) -> list[list[str]]:
    """Each node's SGLang flags (after ``python -m sglang_xshare.launch_server``), ``--xshare-*`` last."""
    args = parse_args([*LAUNCHER, *BEFORE, "--", *user, *XSHARE])
    argvs, _ = node_commands(args, planned_contexts(args, "python"))
    out = []
    for argv in argvs:
        assert argv[:3] == ["python", "-m", "sglang_xshare.launch_server"]
        assert argv[-len(XSHARE):] == XSHARE
        out.append(argv[3:-len(XSHARE)])
    return out


def _launcher_set(rank: int) -> list[str]:
    return ["--nnodes", "2", "--node-rank", str(rank), "--dist-init-addr", f"{IPS[0]}:5000", "--tp-size", "4",
            "--ep-size", "2"]


def test_user_flags_reach_sglang_unchanged(sglang_parser):
    for rank, sg in enumerate(_node_argvs(AFTER)):
        got = vars(sglang_parser.parse_args(sg))
        want = vars(sglang_parser.parse_args([*BEFORE, *AFTER, *_launcher_set(rank)]))
        assert got == want, {k: (got[k], want.get(k)) for k in got if got[k] != want.get(k)}
        assert (got["host"], got["port"], got["model_path"], got["served_model_name"]) == \
            ("10.1.0.1", 31001, "/models/m", "my model")
        assert (got["tp_size"], got["ep_size"], got["node_rank"]) == (4, 2, rank)


def test_default_host_is_every_interface(sglang_parser):
    """No ``--host``: node 0's server must be reachable from the launcher (SGLang's own default is
    loopback), everything else as the user typed it."""
    user = [t for t in AFTER if t not in ("--host", "10.1.0.1")]
    for rank, sg in enumerate(_node_argvs(user)):
        got = vars(sglang_parser.parse_args(sg))
        want = vars(sglang_parser.parse_args([*BEFORE, *user, *_launcher_set(rank), "--host", "0.0.0.0"]))
        assert got == want
    default = vars(sglang_parser.parse_args(["--model-path", "m"]))["host"]
    assert default != "0.0.0.0"  # the launcher's addition is needed


def test_node_command_passes_sglangs_own_checks():
    """``prepare_server_args`` (SGLang's parser and its checks) takes node 1's command."""
    from sglang.srt.server_args import prepare_server_args

    sa = prepare_server_args(_node_argvs(AFTER)[1])
    assert (sa.host, sa.port, sa.nnodes, sa.node_rank, sa.tp_size, sa.ep_size, sa.dist_init_addr) == \
        ("10.1.0.1", 31001, 2, 1, 4, 2, f"{IPS[0]}:5000")
    assert (sa.model_path, sa.trust_remote_code, sa.mem_fraction_static, sa.context_length) == \
        ("/models/m", True, 0.71, 4096)


def test_ipv6_rendezvous_address_is_bracketed(sglang_parser):
    """Node 0 at an IPv6 address: ``--dist-init-addr [ADDR]:PORT`` (SGLang splits host and port at
    the last colon inside the brackets)."""
    args = parse_args([*LAUNCHER[:-4], "--node-ips", "fd00::1,fd00::2", "--master-port", "5000", *BEFORE])
    argvs, _ = node_commands(args, planned_contexts(args, "python"))
    for argv in argvs:
        assert vars(sglang_parser.parse_args(argv[3:]))["dist_init_addr"] == "[fd00::1]:5000"


def test_health_url_follows_the_users_host_and_port():
    """The launcher polls node 0's server where the user's ``--host`` / ``--port`` put it; a
    wildcard host (``0.0.0.0``, ``::``) or none means node 0's own address."""
    from sglang_xshare.launch.commands import health_url

    assert health_url("10.1.0.1", ["--host", "10.9.9.9", "--port", "31001"]) == "http://10.9.9.9:31001/health"
    for wildcard in (["--host", "0.0.0.0"], ["--host", "::"], ["--host="], []):
        assert health_url("10.1.0.1", [*wildcard, "--port=31002"]) == "http://10.1.0.1:31002/health", wildcard
    assert health_url("fd00::1", []) == "http://[fd00::1]:30000/health"


def test_user_env_reaches_every_node_and_wins():
    args = parse_args([*LAUNCHER, "--env", "FOO=bar", "--env", "PYTHONUNBUFFERED=0", *BEFORE])
    _, envs = node_commands(args, planned_contexts(args, "python"))
    for rank, env in enumerate(envs):
        assert (env["FOO"], env["PYTHONUNBUFFERED"], env["SGLANG_XSHARE_NODE_RANK"]) == ("bar", "0", str(rank))


def test_ep_size_must_divide_tp_size():
    from sglang_xshare.config import XShareConfigError

    for ep in ("3", "0", "8"):
        with pytest.raises(XShareConfigError, match=r"^--ep-size"):
            parse_args(["--nnodes", "2", "--gpus-per-node", "2", "--tp-size", "4", "--ep-size", ep, *BEFORE])
