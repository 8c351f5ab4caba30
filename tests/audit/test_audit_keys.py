"""Signing keys: file permissions, the keyring, rotation recorded in the log, continuity of signers."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest

from audit import keys
from audit.checkpoint import Checkpoint
from audit.errors import AuditKeyError
from audit.keys import Keyring
from audit.verify import verify_log


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keygen_writes_a_private_key_only_the_owner_can_read(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    key_id = keys.keygen(key_dir)
    assert _mode(key_dir) == 0o700
    assert _mode(key_dir / "signing.key") == 0o600
    assert (key_dir / "signing.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    ring = Keyring.load(key_dir)
    assert list(ring.keys) == [key_id] and ring.keys[key_id].retired is None
    signer = keys.load_signer(key_dir)
    assert signer.key_id == key_id
    assert ring.verify(key_id, b"msg", signer.sign(b"msg"))
    assert not ring.verify(key_id, b"other", signer.sign(b"msg"))
    assert Keyring.load(key_dir / "signing.pub").keys.keys() == {key_id}
    with pytest.raises(FileExistsError):
        keys.keygen(key_dir)


def test_keyring_rejects_an_entry_whose_id_does_not_match_its_key(tmp_path: Path) -> None:
    keys.keygen(tmp_path / "keys")
    data = json.loads((tmp_path / "keys" / "keyring.json").read_text())
    data["keys"][0]["key_id"] = "0" * 16
    (tmp_path / "keys" / "keyring.json").write_text(json.dumps(data))
    with pytest.raises(AuditKeyError):
        Keyring.load(tmp_path / "keys")


def test_key_ring_from_public_keys(tmp_path: Path) -> None:
    key_id = keys.keygen(tmp_path / "keys")
    pem = (tmp_path / "keys" / "signing.pub").read_text()
    assert key_id in Keyring.coerce({key_id: pem})
    assert key_id in Keyring.coerce([pem])
    with pytest.raises(AuditKeyError):
        Keyring.coerce({"f" * 16: pem})


def test_rotation_is_logged_and_old_checkpoints_keep_verifying(new_log, make_event, tmp_path: Path) -> None:
    log = new_log(checkpoint_every=5)
    for i in range(12):
        log.append(make_event(i))
    old_ring = tmp_path / "keyring-before.json"
    shutil.copy(log.key_dir / "keyring.json", old_ring)
    old_id, new_id = log.rotate_key(actor={"principal": "root", "role": "admin"})
    assert old_id != new_id
    rotated = log.records()[12]
    assert rotated["event"] == "key_rotated" and rotated["actor"]["principal"] == "root"
    assert (rotated["old_key_id"], rotated["new_key_id"]) == (old_id, new_id)
    for i in range(12, 20):
        log.append(make_event(i))
    log.close()

    ring = Keyring.load(log.key_dir)
    assert set(ring.keys) == {old_id, new_id}
    assert ring.keys[old_id].retired is not None and ring.keys[new_id].retired is None
    assert keys.load_signer(log.key_dir).key_id == new_id
    signers = [json.loads(x)["key_id"] for x in log.checkpoints_path.read_bytes().splitlines()]
    # 5, 10 (old); 13 sealed by the old key (covers the rotation record) then by the new; 18 and 21 (new)
    assert signers == [old_id, old_id, old_id, new_id, new_id, new_id]
    report = verify_log(log.directory, log.key_dir)
    assert report.ok and report.checkpoints == 6, report.message
    # with only the keys known before the rotation, the old checkpoints verify, the new ones do not
    report = verify_log(log.directory, old_ring)
    assert not report.ok and "unknown key id" in report.message and report.bad_checkpoint == 4


def test_a_key_change_the_log_never_announced_is_flagged(new_log, make_event) -> None:
    log = new_log(checkpoint_every=1000)
    log.append(make_event(0))
    log.checkpoint()
    keys.rotate(log.key_dir)  # offline rotation, not recorded in the log
    log.append(make_event(1))
    log.checkpoint()
    report = verify_log(log.directory, log.key_dir)
    assert not report.ok and report.bad_checkpoint == 2
    assert "never announced a rotation" in report.message


def test_a_retired_key_cannot_sign_later_checkpoints(new_log, make_event) -> None:
    log = new_log(checkpoint_every=1000)
    log.append(make_event(0))
    log.checkpoint()
    stolen = keys.load_signer(log.key_dir)  # a copy of the old key, leaked before rotation
    log.rotate_key()
    log.append(make_event(1))
    log.close()
    forged = Checkpoint.create(3, bytes.fromhex(log.latest_checkpoint().root_hash), stolen)
    with open(log.checkpoints_path, "ab") as f:
        f.write(forged.to_line())
    report = verify_log(log.directory, log.key_dir)
    assert not report.ok and "after its retirement" in report.message


def test_another_writer_notices_a_rotation(new_log, make_event) -> None:
    a, b = new_log(checkpoint_every=1000), new_log(checkpoint_every=1000)
    a.append(make_event(0))
    b.append(make_event(1))
    b.checkpoint()  # b now caches the first key
    _, new_id = a.rotate_key()
    b.append(make_event(2))
    assert b.checkpoint().key_id == new_id
    assert verify_log(a.directory, a.key_dir).ok
