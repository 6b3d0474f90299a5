maybe:
  test.succeed_without_changes:
    - require_any:
      - test: bad_a
      - test: good_b
never:
  test.succeed_without_changes:
    - require_any:
      - test: bad_a
      - test: bad_c
bad_a:
  test.fail_without_changes: []
good_b:
  test.succeed_with_changes: []
bad_c:
  test.fail_with_changes: []
