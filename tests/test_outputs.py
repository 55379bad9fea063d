"""The output protocol: refuse to overwrite users' files, publish atomically, clean up."""

import json
import os
import stat
import time

import pytest
from conftest import dead_pid, output_host

from ezsasrec_ray import outputs
from ezsasrec_ray.errors import EzSASRecError


def _publish(path, files, *, overwrite=False, kind="scores", extra=None):
    with outputs.writing(str(path), overwrite=overwrite, kind=kind, extra=extra) as w:
        for name, text in files.items():
            with open(os.path.join(w.tmp, name), "w") as f:
                f.write(text)
    return path


def _one_line(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_refuses_to_overwrite_a_users_directory(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_text("meow")
    with pytest.raises(EzSASRecError) as err:
        _publish(photos, {"a": "1"}, overwrite=True)
    message = _one_line(err)
    assert str(photos) in message and "not written by ezsasrec_ray" in message
    assert (photos / "cat.jpg").read_text() == "meow"
    assert sorted(os.listdir(tmp_path)) == ["photos"]  # no temporary left behind


def test_refuses_a_regular_file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep")
    with pytest.raises(EzSASRecError) as err:
        outputs.check_output(str(target), overwrite=True)
    assert str(target) in _one_line(err) and "left untouched" in str(err.value)
    assert target.read_text() == "keep"


def test_exists_without_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(EzSASRecError) as err:
        outputs.start(str(tmp_path / "out"), overwrite=False, flag="--model-dir")
    assert _one_line(err) == (f"--model-dir {tmp_path / 'out'}: already exists; pass "
                              "--overwrite to replace it")


def test_overwrites_an_empty_directory(tmp_path):
    (tmp_path / "out").mkdir()
    _publish(tmp_path / "out", {"a": "1"}, overwrite=True)
    assert (tmp_path / "out" / "a").read_text() == "1"


def test_overwrites_its_own_output(tmp_path):
    out = _publish(tmp_path / "out", {"a": "old"})
    assert outputs.written_by_us(out)
    _publish(out, {"b": "new"}, overwrite=True)
    assert sorted(os.listdir(out)) == ["_SUCCESS", "b"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no .old / .tmp leftovers


def test_marker_content(tmp_path):
    out = _publish(tmp_path / "out", {}, kind="model", extra={"rows": 3, "written_by": "x"})
    marker = json.loads((out / outputs.MARKER).read_text())
    assert marker["written_by"] == "ezsasrec_ray"  # extra cannot override the identity
    assert marker["kind"] == "model" and marker["format_version"] == 1
    assert marker["rows"] == 3 and marker["written_at"].endswith("+00:00")


def test_extra_set_inside_the_block(tmp_path):
    with outputs.writing(str(tmp_path / "out"), overwrite=False, kind="log") as w:
        w.extra["users"] = 7
    assert json.loads((tmp_path / "out" / "_SUCCESS").read_text())["users"] == 7


@pytest.mark.parametrize("files", [
    {"manifest.json": json.dumps({"format_version": 1})},
    {"manifest.json": json.dumps({"format_version": 1}), "_SUCCESS": ""},
    {"metrics.json": json.dumps({"format_version": 1}), "config.json": "{}"},
])
def test_recognises_outputs_of_earlier_versions(tmp_path, files):
    out = tmp_path / "legacy"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    assert outputs.written_by_us(out)
    outputs.check_output(str(out), overwrite=True)


@pytest.mark.parametrize("files", [
    {"manifest.json": json.dumps({"name": "x"})},
    {"manifest.json": "not json"},
    {"metrics.json": json.dumps({"format_version": 1})},  # no config.json
    {"_SUCCESS": ""},
    {"_SUCCESS": json.dumps({"committer": "s3a"}), "manifest.json": '{"format_version": 1}'},
])
def test_does_not_recognise_others(tmp_path, files):
    out = tmp_path / "other"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    assert not outputs.written_by_us(out)
    with pytest.raises(EzSASRecError):
        outputs.check_output(str(out), overwrite=True)


def test_stale_temporaries_are_removed_and_others_kept(tmp_path):
    out = tmp_path / "out"
    host = output_host()
    dead = tmp_path / f".out.tmp-{host}-{dead_pid()}-0123abcd"
    live = tmp_path / f".out.tmp-{host}-{os.getpid()}-4567abcd"
    far_old = tmp_path / ".out.tmp-elsewhere-12-89abcdef"
    far_new = tmp_path / ".out.tmp-elsewhere-13-89abcdef"
    other_output = tmp_path / f".outx.tmp-{host}-{dead_pid()}-0123abcd"
    keep = [live, far_new, other_output, tmp_path / ".out.tmp-keep", tmp_path / ".hidden",
            tmp_path / "out.old-0123abcd"]
    for d in [dead, far_old, *keep]:
        d.mkdir()
    day_ago = time.time() - 25 * 3600
    os.utime(far_old, (day_ago, day_ago))
    tmp = outputs.start(str(out), overwrite=False)
    assert not dead.exists() and not far_old.exists()
    assert all(d.exists() for d in keep)
    assert os.path.dirname(tmp) == str(tmp_path) and os.path.isdir(tmp)
    assert os.path.basename(tmp).startswith(f".out.tmp-{host}-{os.getpid()}-")
    outputs.discard(tmp)


def test_interrupted_replace_is_put_back(tmp_path):
    out = _publish(tmp_path / "out", {"a": "1"})
    os.rename(out, tmp_path / ".out.old-0123abcd")  # killed between the two renames
    with pytest.raises(EzSASRecError, match="already exists"):
        outputs.start(str(out), overwrite=False)
    assert (out / "a").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_failure_leaves_no_temporary_and_the_previous_output(tmp_path):
    out = _publish(tmp_path / "out", {"a": "old"})
    with pytest.raises(RuntimeError):
        with outputs.writing(str(out), overwrite=True, kind="scores") as w:
            open(os.path.join(w.tmp, "a"), "w").close()
            raise RuntimeError("boom")
    assert (out / "a").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_published_directory_is_not_private(tmp_path):
    out = _publish(tmp_path / "out", {"a": "1"})
    mode = stat.S_IMODE(os.stat(out).st_mode)
    plain = tmp_path / "plain"
    plain.mkdir()  # mode 0o777 less the umask
    assert mode != 0o700 and mode == stat.S_IMODE(os.stat(plain).st_mode)


def test_publish_fixes_a_mkdtemp_directory(tmp_path):
    import tempfile

    tmp = tempfile.mkdtemp(dir=tmp_path)
    outputs.publish(tmp, str(tmp_path / "out"), kind="model")
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) != 0o700


def test_destination_appearing_meanwhile_is_refused(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(EzSASRecError, match="already exists"):
        with outputs.writing(str(out), overwrite=False, kind="scores"):
            out.mkdir()
            (out / "theirs").write_text("x")
    assert (out / "theirs").read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_uris(tmp_path):
    _publish(f"file://{tmp_path / 'out'}", {"a": "1"})
    assert (tmp_path / "out" / "a").exists()
    with pytest.raises(EzSASRecError) as err:
        outputs.start("s3://bucket/out", overwrite=False)
    assert "s3://bucket/out" in _one_line(err) and "local or shared filesystem" in str(err.value)


def test_discard_refuses_a_non_temporary(tmp_path):
    out = _publish(tmp_path / "out", {"a": "1"})
    with pytest.raises(EzSASRecError):
        outputs.discard(str(out))
    assert out.exists()
    outputs.discard(str(tmp_path / ".out.tmp-h-1-0123abcd"))  # missing: fine


def test_write_json_atomic(tmp_path):
    path = tmp_path / "sub" / "state.json"
    outputs.write_json_atomic(str(path), {"a": 1})
    outputs.write_json_atomic(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(path.parent) == ["state.json"]
    with pytest.raises(TypeError):  # tuple keys cannot be JSON: the old file stays
        outputs.write_json_atomic(str(path), {(1, 2): 3})
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(path.parent) == ["state.json"]
