"""The by-vector body both services parse (serve and serve --ray share serve.vector_query): what it accepts and
how it refuses, without a server."""
import json

import numpy as np
import pytest

from resnet_batch.search.serve import BadRequest, vector_query


def test_a_vector_and_k_are_read():
    vector, k = vector_query(json.dumps({"vector": [0.5, 1, -2], "k": 3}).encode())
    assert vector.dtype == np.float32 and vector.tolist() == [0.5, 1.0, -2.0] and k == 3
    assert vector_query(b'{"vector": [1]}')[1] == 10


@pytest.mark.parametrize("raw, status, words", [
    (b"not json", 400, "the body must be JSON"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "the body must be JSON"),  # deeper than the parser goes
    (b'{"k": 3}', 400, "the body must be JSON"),
    (b'{"vector": [1], "k": true}', 400, "k must be a whole number, got True"),
    (b'{"vector": [1], "k": "5"}', 400, "k must be a whole number, got '5'"),
    (b'{"vector": ["a"]}', 422, "vector must be a list of numbers"),
])
def test_bodies_that_are_not_a_query_are_refused(raw, status, words):
    with pytest.raises(BadRequest) as err:
        vector_query(raw)
    assert err.value.status == status and words in str(err.value)
