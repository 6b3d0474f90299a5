good:
  test.succeed_without_changes: []
bad:
  test.fail_without_changes: []
handler:
  test.succeed_without_changes:
    - onfail_any:
      - test: good
      - test: bad
