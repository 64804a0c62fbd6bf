"""`sat_tf.card`: a damaged or forged robustness card is one line naming the file and the fix,
read within a bounded budget, and never overwritten by an evaluation that cannot parse it."""

import os
import time
import tracemalloc

import pytest

from sat_tf import card, rundir

pytestmark = pytest.mark.backends

CARD = {"format": "sat_tf.robustness_card/1", "evaluations": []}


def one_line(info):
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    return message


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ('{"format": "sat_tf.robustness_card/1", "evaluations": [', "is not valid JSON"),
        ("[1, 2]", "is not a JSON object"),
        ('{"evaluations": {"a": 1}}', "has evaluations that are not a list"),
        (b"\xff\xfe not utf-8", "is not valid JSON"),
    ],
    ids=["cut", "list", "evaluations", "bytes"],
)
def test_a_damaged_card_is_one_line_naming_the_file_and_the_fix(tmp_path, payload, match):
    path = tmp_path / rundir.CARD
    path.write_bytes(payload.encode() if isinstance(payload, str) else payload)
    with pytest.raises(card.CardError) as info:
        card.read(tmp_path)
    message = one_line(info)
    assert message.startswith(f"{path} {match}"), message
    assert "Restore it from a copy, or remove it" in message, message
    assert issubclass(card.CardError, ValueError)


def test_a_card_that_is_a_directory_or_a_fifo_is_refused(tmp_path):
    (tmp_path / rundir.CARD).mkdir()
    with pytest.raises(card.CardError, match="is a directory, not a file"):
        card.read(tmp_path)
    (tmp_path / rundir.CARD).rmdir()
    os.mkfifo(tmp_path / rundir.CARD)  # would block a reader that opened it normally
    with pytest.raises(card.CardError, match="is not a regular file"):
        card.read(tmp_path)


def test_a_forged_huge_card_is_refused_without_reading_it(tmp_path):
    with open(tmp_path / rundir.CARD, "wb") as f:
        f.truncate(256 * 2**20)  # sparse: claims 256 MiB, costs nothing
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(card.CardError) as info:
        card.read(tmp_path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert f"{tmp_path / rundir.CARD} is over 16 MiB" in one_line(info)
    assert peak < 64 * 2**20 and time.perf_counter() - start < 2


def test_an_evaluation_never_overwrites_a_damaged_card(tmp_path):
    path = tmp_path / rundir.CARD
    path.write_text('{"evaluations": [{"protocol": "sat", "worst_case"')  # cut mid-write
    before = path.read_bytes()
    with pytest.raises(card.CardWriteError) as info:
        card.add_evaluation(tmp_path, {"protocol": "sat"}, saved=tmp_path / "eval")
    message = one_line(info)
    assert f"its reports are saved in {tmp_path / 'eval'}" in message, message
    assert f"{path} is not valid JSON" in message and "left as it is" in message, message
    assert path.read_bytes() == before


def test_a_good_card_still_reads_and_appends(tmp_path):
    card.write(tmp_path, CARD)
    card.add_evaluation(tmp_path, {"protocol": "sat"})
    assert card.read(tmp_path)["evaluations"] == [{"protocol": "sat"}]
    assert card.read(tmp_path / "none") is None
