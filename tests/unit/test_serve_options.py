"""How `tcsched serve`'s tritonserver options merge with the ones tcsched sets (tcsched.server.TritonServer.command):
the admin API restriction stays whatever is passed through, a model control mode other than explicit drops
--load-model and the stub watchdog."""

from tcsched.server import TritonServer


def flags(server: TritonServer) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for a in server.command()[1:]:
        k, _, v = a.partition("=")
        out.setdefault(k, []).append(v)
    return out


def test_defaults_are_explicit_with_the_restriction(tmp_path):
    s = TritonServer(tmp_path)
    f = flags(s)
    assert f["--model-control-mode"] == ["explicit"] and f["--load-model"] == ["*"]
    assert f["--http-restricted-api"][0].startswith("shared-memory,model-repository,logging,trace:")
    assert s.watchdog_active


def test_a_passed_mode_replaces_the_default_and_keeps_the_restriction(tmp_path):
    s = TritonServer(tmp_path, extra_args=["--model-control-mode=poll", "--repository-poll-secs=5"])
    f = flags(s)
    assert f["--model-control-mode"] == ["poll"] and "--load-model" not in f
    assert f["--repository-poll-secs"] == ["5"]
    assert f["--http-restricted-api"] and f["--grpc-restricted-protocol"]
    assert s.model_control_mode == "poll" and not s.watchdog_active


def test_explicit_passed_through_is_not_doubled(tmp_path):
    s = TritonServer(tmp_path, extra_args=["--model-control-mode=explicit", "--log-format=ISO8601"])
    f = flags(s)
    assert f["--model-control-mode"] == ["explicit"] and f["--load-model"] == ["*"]
    assert f["--log-format"] == ["ISO8601"] and s.watchdog_active
