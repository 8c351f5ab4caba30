"""Every kind of tampering an attacker with write access to the log directory can try is detected and located."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audit import keys
from audit.checkpoint import Checkpoint
from audit.keys import Keyring
from audit.merkle import MerkleTree, leaf_hash
from audit.verify import verify_log


def test_untouched_log_verifies(filled) -> None:
    log, files = filled
    report = verify_log(log.directory, log.key_dir)
    assert report.ok and report.status == "ok"
    assert report.records == 30 and report.checkpoints == 3 and report.covered == 30
    assert report.first_bad is None and report.problems == []
    assert report.root_hash == MerkleTree([leaf_hash(x) for x in files.lines()]).root().hex()
    assert verify_log(log.directory, log.key_dir, strict=True).ok


def test_one_edited_byte_is_located(filled) -> None:
    log, files = filled
    lines = files.lines()
    assert b'"principal":"alice"' in lines[15]
    lines[15] = lines[15].replace(b'"principal":"alice"', b'"principal":"alicf"')
    files.write_lines(lines)
    report = verify_log(log.directory, log.key_dir)
    assert not report.ok and report.status == "tampered"
    assert (report.first_bad, report.first_bad_line) == (15, 16)
    assert "position 15 (line 16)" in report.message and "modified" in report.message
    assert any("tree size 20" in p and "Merkle root differs" in p for p in report.problems)
    assert log.verify()[0] is False


def test_edited_last_record_is_caught_by_the_checkpoint(filled) -> None:
    log, files = filled
    lines = files.lines()
    lines[29] = lines[29].replace(b'"principal":"alice"', b'"principal":"mallory"')
    files.write_lines(lines)
    report = verify_log(log.directory, log.key_dir)
    assert not report.ok
    assert report.first_bad is not None and 20 <= report.first_bad <= 29  # after the last matching checkpoint
    assert "tree size 30" in report.message


def test_deleted_record_is_located(filled) -> None:
    log, files = filled
    lines = files.lines()
    del lines[12]
    files.write_lines(lines)
    report = verify_log(log.directory, log.key_dir)
    assert not report.ok and report.first_bad == 12 and report.first_bad_line == 13
    assert "expected seq 12 but found 13" in report.message


def test_swapped_records_are_located(filled) -> None:
    log, files = filled
    lines = files.lines()
    lines[7], lines[8] = lines[8], lines[7]
    files.write_lines(lines)
    report = verify_log(log.directory, log.key_dir)
    assert not report.ok and report.first_bad == 7
    assert "expected seq 7 but found 8" in report.message


def test_inserted_forged_record_is_located(filled) -> None:
    log, files = filled
    lines = files.lines()
    # a well-formed forgery that even links correctly to the record before it
    forged = files.forge(lines[5], seq=5, prev_hash=files.leaf_hex(lines[4]), decision="denied")
    files.write_lines(lines[:5] + [forged] + lines[5:])
    report = verify_log(log.directory, log.key_dir)
    assert not report.ok and report.first_bad == 5 and report.first_bad_line == 6
    assert "inserted" in report.message


def test_inserted_record_with_a_wrong_seq_is_located(filled) -> None:
    log, files = filled
    lines = files.lines()
    forged = files.forge(lines[3], seq=99)
    files.write_lines(lines[:9] + [forged] + lines[9:])
    report = verify_log(log.directory, log.key_dir)
    assert not report.ok and report.first_bad == 9


def test_truncation_behind_a_checkpoint(filled) -> None:
    log, files = filled
    files.write_lines(files.lines()[:25])
    report = verify_log(log.directory, log.key_dir)
    assert not report.ok and report.status == "tampered"
    assert report.first_bad == 25 and "truncated" in report.message


def test_cutting_into_a_checkpointed_record_is_truncation_not_a_torn_tail(filled) -> None:
    log, files = filled
    data = files.log.read_bytes()
    files.log.write_bytes(data[:-40])
    report = verify_log(log.directory, log.key_dir)
    assert report.status == "tampered" and report.torn_line is None
    assert report.first_bad == 29 and "truncated" in report.message


def test_rewritten_history_with_recomputed_chain(filled, tmp_path: Path) -> None:
    """An attacker rewrites records 12.. with a recomputed hash chain and drops later checkpoints."""
    log, files = filled
    exported = log.export_checkpoint(tmp_path / "offsite")
    lines = files.lines()
    for i in range(12, 30):
        changes = {"prev_hash": files.leaf_hex(lines[i - 1])}
        if i == 12:
            changes["decision"] = "denied"
        lines[i] = files.forge(lines[i], **changes)
    files.write_lines(lines)
    report = verify_log(log.directory, log.key_dir)
    assert not report.ok and report.first_bad == 10  # first record after the last checkpoint that still matches
    assert "rewritten" in report.message
    # dropping the checkpoints that no longer match hides it from the log's own checkpoints ...
    files.write_checkpoint_lines(files.checkpoint_lines()[:1])
    assert verify_log(log.directory, log.key_dir).ok
    # ... but not from a checkpoint kept elsewhere
    report = verify_log(log.directory, log.key_dir, trusted_checkpoint=exported)
    assert not report.ok and "trusted checkpoint" in report.message and report.first_bad == 10


def _resign(line: bytes, key: Ed25519PrivateKey, key_id: str) -> bytes:
    data = json.loads(line)
    cp = Checkpoint(data["tree_size"], data["root_hash"], data["time"], key_id, "")
    data["signature"] = base64.b64encode(key.sign(cp.message())).decode()
    data["key_id"] = key_id
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def test_checkpoint_resigned_by_an_unknown_key(filled) -> None:
    log, files = filled
    attacker = Ed25519PrivateKey.generate()
    cps = files.checkpoint_lines()
    cps[1] = _resign(cps[1], attacker, keys.key_id_of(attacker.public_key()))
    files.write_checkpoint_lines(cps)
    report = verify_log(log.directory, log.key_dir)
    assert not report.ok and report.bad_checkpoint == 2
    assert "unknown key id" in report.message


def test_checkpoint_with_the_real_key_id_but_another_signature(filled) -> None:
    log, files = filled
    cps = files.checkpoint_lines()
    real_id = json.loads(cps[2])["key_id"]
    cps[2] = _resign(cps[2], Ed25519PrivateKey.generate(), real_id)
    files.write_checkpoint_lines(cps)
    report = verify_log(log.directory, log.key_dir)
    assert not report.ok and report.bad_checkpoint == 3 and "bad signature" in report.message


def test_attacker_key_added_to_the_servers_keyring_is_not_trusted_by_the_auditor(filled, tmp_path) -> None:
    log, files = filled
    auditor_copy = tmp_path / "auditor-keyring.json"
    shutil.copy(log.key_dir / "keyring.json", auditor_copy)
    attacker = Ed25519PrivateKey.generate()
    ring = Keyring.load(log.key_dir)
    ring.keys[keys.key_id_of(attacker.public_key())] = keys.KeyInfo(
        keys.key_id_of(attacker.public_key()), attacker.public_key()
    )
    (log.key_dir / "keyring.json").write_text(ring.to_json())
    lines = files.lines()
    lines[3] = lines[3].replace(b'"decision":"allowed"', b'"decision":"denied"')
    files.write_lines(lines)
    cps = files.checkpoint_lines()
    tree = MerkleTree([leaf_hash(x) for x in lines])
    resigned = []
    for line in cps:
        data = json.loads(line)
        data["root_hash"] = tree.root(data["tree_size"]).hex()
        resigned.append(_resign(json.dumps(data).encode(), attacker, keys.key_id_of(attacker.public_key())))
    files.write_checkpoint_lines(resigned)
    report = verify_log(log.directory, auditor_copy)
    assert not report.ok and "unknown key id" in " ".join(report.problems)
    assert report.first_bad == 3  # the chain still names the edited record


def test_inconsistent_checkpoint_from_a_forked_log(filled, make_event, tmp_path: Path) -> None:
    """A validly signed checkpoint of another version of the log (a split view) is detected."""
    log, files = filled
    fork_dir = tmp_path / "fork"
    shutil.copytree(log.directory, fork_dir)
    from audit.log import AuditLog

    fork = AuditLog(fork_dir, key_dir=log.key_dir)
    fork.append(make_event(100, decision="denied"))
    fork_cp = fork.checkpoint()
    log.append(make_event(100))
    log.checkpoint()
    assert verify_log(log.directory, log.key_dir).ok and verify_log(fork_dir, log.key_dir).ok
    cps = files.checkpoint_lines()
    files.write_checkpoint_lines(cps + [fork_cp.to_line().rstrip(b"\n")])
    report = verify_log(log.directory, log.key_dir)
    assert not report.ok and report.bad_checkpoint == len(cps) + 1
    assert "inconsistent with the log" in report.message
    # the fork's checkpoint as a trusted anchor is just as inconsistent
    files.write_checkpoint_lines(cps)
    report = verify_log(log.directory, log.key_dir, trusted_checkpoint=fork_cp)
    assert not report.ok and "trusted checkpoint 0" in report.message


def test_checkpoints_out_of_order(filled) -> None:
    log, files = filled
    cps = files.checkpoint_lines()
    files.write_checkpoint_lines([cps[0], cps[2], cps[1]])
    report = verify_log(log.directory, log.key_dir)
    assert not report.ok and report.bad_checkpoint == 3 and "out of order" in report.message


def test_malformed_checkpoint_line(filled) -> None:
    log, files = filled
    cps = files.checkpoint_lines()
    files.write_checkpoint_lines(cps[:1] + [b'{"tree_size": "many"}'] + cps[1:])
    report = verify_log(log.directory, log.key_dir)
    assert not report.ok and report.bad_checkpoint == 2 and "malformed" in report.message


def test_trusted_anchor_detects_a_log_truncated_with_its_checkpoints(filled, tmp_path: Path) -> None:
    log, files = filled
    exported = log.export_checkpoint(tmp_path / "anchor.json")
    files.write_lines(files.lines()[:20])
    files.write_checkpoint_lines(files.checkpoint_lines()[:2])
    assert verify_log(log.directory, log.key_dir).ok  # self-consistent after the attack ...
    report = verify_log(log.directory, log.key_dir, trusted_checkpoint=exported)
    assert not report.ok and report.first_bad == 20 and "truncated" in report.message  # ... not with the anchor


def test_strict_mode_checks_fields_the_fast_mode_treats_as_bytes(new_log, make_event) -> None:
    log = new_log(checkpoint_every=1000)
    for i in range(5):
        log.append(make_event(i))
    lines = log.path.read_bytes().split(b"\n")[:-1]
    lines[4] = lines[4].replace(b'"schema_version":1', b'"schema_version":9')  # last record: no successor
    log.path.write_bytes(b"".join(x + b"\n" for x in lines))
    assert verify_log(log.directory, log.key_dir).ok
    report = verify_log(log.directory, log.key_dir, strict=True)
    assert not report.ok and report.first_bad == 4 and "schema_version" in report.message


def test_uncheckpointed_edit_is_located_by_the_chain(new_log, make_event) -> None:
    log = new_log(checkpoint_every=1000)
    for i in range(8):
        log.append(make_event(i))
    lines = log.path.read_bytes().split(b"\n")[:-1]
    lines[0] = lines[0].replace(b"req-0", b"req-X")
    log.path.write_bytes(b"".join(x + b"\n" for x in lines))
    report = verify_log(log.directory, log.key_dir)
    assert not report.ok and report.first_bad == 0 and report.first_bad_line == 1
