base_svc:
  test.succeed_without_changes: []
base_other:
  test.nop: []
