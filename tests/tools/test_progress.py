"""nstm.progress: bars on at a terminal or under NSTM_PROGRESS=1, silent otherwise."""
import pytest

from nstm.progress import progress, progress_enabled


def test_silent_when_switched_off_and_counts(monkeypatch, capsys):
    monkeypatch.setenv("NSTM_PROGRESS", "0")
    assert not progress_enabled()
    bar = progress(range(5), desc="x")
    assert list(bar) == [0, 1, 2, 3, 4] and bar.n == 5
    with progress(total=7) as bar:
        bar.update(3)
        bar.set_postfix(loss=1.0)
        bar.write("a log line")
    assert bar.n == 3
    out = capsys.readouterr()
    assert out.out == "" and "a log line" in out.err


def test_forced_on_and_bad_value(monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setenv("NSTM_PROGRESS", "1")
    assert progress_enabled()
    assert not progress_enabled(enabled=False)
    monkeypatch.setenv("NSTM_PROGRESS", "yes please")
    with pytest.raises(ValueError, match="NSTM_PROGRESS must be 0 or 1"):
        progress_enabled()


def test_not_a_terminal_means_no_bar(monkeypatch):
    monkeypatch.delenv("NSTM_PROGRESS", raising=False)
    assert not progress_enabled()          # pytest captures stdout: not a tty
