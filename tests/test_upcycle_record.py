"""upcycle.record: upcycling.json is read with one-line errors."""

import pytest

from moekit.llama.errors import MoekitError
from moekit.upcycle.record import read_record


def test_a_record_is_read(tmp_path):
    (tmp_path / "upcycling.json").write_text('{"recipe": "copy", "num_local_experts": 8}')
    assert read_record(tmp_path) == {"recipe": "copy", "num_local_experts": 8}


@pytest.mark.parametrize("text, error", [(None, "upcycling.json not found"), ("[1, 2]", "expected a JSON object"),
                                         ('{"recipe": ', "not valid JSON")])
def test_a_missing_or_bad_record_is_one_line(tmp_path, text, error):
    if text is not None:
        (tmp_path / "upcycling.json").write_text(text)
    with pytest.raises(MoekitError, match=error) as e:
        read_record(tmp_path)
    assert "\n" not in str(e.value)
