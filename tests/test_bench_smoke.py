"""The bench commands still run (no timing asserts: figures are for bench/, not tests)."""
import pytest

from bench import codec


def test_bench_codec_runs_and_implementations_agree(capsys):
    assert codec.main(["--seconds", "0.01", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "pyiso8583" in out and "python" in out
    assert codec.TEST_PAN not in out


def test_bench_rest_runs(capsys):
    import gc

    from bench import rest

    assert rest.main(["--quick", "--connections", "4", "--rate", "50"]) == 0
    out = capsys.readouterr().out
    assert "payments/s" in out and "HTTP {201:" in out
    assert gc.isenabled()  # paused only while a round measures


def test_client_gc_paused_restores_the_collector_on_error():
    import gc

    from bench import rest

    with pytest.raises(ConnectionResetError):
        with rest._client_gc_paused():
            assert not gc.isenabled()
            raise ConnectionResetError
    assert gc.isenabled()
