import pytest

from stylegan.fileio import atomic_path, atomic_write_json


def test_atomic_write_replaces_only_on_success(tmp_path):
    dest = tmp_path / "sub" / "a.json"
    atomic_write_json(dest, {"x": 1})
    assert dest.read_text().strip().startswith("{")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert '"x": 1' in dest.read_text()
    assert [p.name for p in dest.parent.iterdir()] == ["a.json"]


def test_atomic_files_get_the_usual_permissions(tmp_path):
    import os

    dest = tmp_path / "b.json"
    atomic_write_json(dest, {})
    mask = os.umask(0o022)
    os.umask(mask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~mask


def test_checkpoints_respect_the_umask(tmp_path):
    """safetensors replaces the temporary file atomic_path made: the finished network and
    encoder files must still get 0666 & ~umask (0644 under umask 022), not mkstemp's 0600."""
    import os

    from anomaly.model.encoder_io import save_encoder
    from encoder_helpers import tiny_encoder, tiny_networks
    from stylegan.checkpoint import save_networks

    G, D = tiny_networks()
    before = os.umask(0o022)
    try:
        network = save_networks(tmp_path / "net.safetensors", G=G, D=D, G_ema=G)
        encoder = tmp_path / "encoder.safetensors"
        save_encoder(encoder, tiny_encoder(G))
    finally:
        os.umask(before)
    assert network.stat().st_mode & 0o777 == 0o644
    assert encoder.stat().st_mode & 0o777 == 0o644


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path, monkeypatch):
    """A run killed inside atomic_path leaves its temporary; the next write into the folder
    removes it, and keeps files of other names, of running processes and newer than the run."""
    import os
    import subprocess
    import sys
    import time

    from stylegan import fileio

    code = ("import sys, time\nfrom stylegan.fileio import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'x' * 1000)\n    print('written', flush=True)\n"
            "    time.sleep(60)\n")
    writer = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "net.safetensors")],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert writer.stdout.readline().strip() == "written"
    finally:
        writer.kill()
        writer.wait(timeout=10)
    (left,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert left.name.startswith(".net.safetensors.anostyle-") and left.stat().st_size == 1000
    host, alive = fileio._host(), os.getpid()
    keep = [tmp_path / ".notes.abcdefgh.tmp", tmp_path / "data.tmp",  # not our pattern
            tmp_path / f".a.json.anostyle-{host}-{alive}-abcdefgh.tmp",  # a running process
            tmp_path / f".b.json.anostyle-other_host-{writer.pid}-abcdefgh.tmp"]  # elsewhere
    for path in keep:
        path.write_text("mine")
    monkeypatch.setattr(fileio, "_STARTED", time.time() + 1)  # this run started after them
    monkeypatch.setattr(fileio, "_swept", set())
    fileio.atomic_write_json(tmp_path / "other.json", {"x": 1})
    assert not left.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [p.name for p in keep] + ["other.json"])
    left.write_text("newer than the run")  # a dead writer's file, but newer than this run
    monkeypatch.setattr(fileio, "_STARTED", time.time() - 60)
    assert fileio.remove_stale_temporaries(tmp_path, force=True) == []
