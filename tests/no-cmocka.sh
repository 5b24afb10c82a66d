#!/bin/bash
# tests/no-cmocka.sh - stands in for the unit tests when configure found no
# cmocka: `make check` must not pass without them.
echo "FAIL: the unit tests (tests/test_*.c) need cmocka: install libcmocka-dev" \
     "(scripts/deps.sh does) and rerun configure" >&2
exit 1
