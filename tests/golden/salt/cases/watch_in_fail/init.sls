svc:
  test.succeed_without_changes: []
conf:
  test.fail_with_changes:
    - watch_in:
      - test: svc
after:
  test.nop:
    - require:
      - svc
