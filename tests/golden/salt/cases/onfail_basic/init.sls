recover:
  test.succeed_with_changes:
    - onfail:
      - test: breaks
not_needed:
  test.succeed_with_changes:
    - onfail:
      - test: works
breaks:
  test.fail_without_changes: []
works:
  test.succeed_without_changes: []
