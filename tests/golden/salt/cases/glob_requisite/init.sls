done:
  test.nop:
    - require:
      - test: web_*
web_a:
  test.succeed_with_changes: []
db:
  test.nop: []
web_b:
  test.fail_without_changes: []
