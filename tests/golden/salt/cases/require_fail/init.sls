broken:
  test.fail_without_changes: []
needs_broken:
  test.succeed_with_changes:
    - require:
      - test: broken
needs_needs:
  test.succeed_without_changes:
    - require:
      - needs_broken
independent:
  test.succeed_without_changes: []
