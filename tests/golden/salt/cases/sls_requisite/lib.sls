lib_one:
  test.succeed_with_changes: []
lib_two:
  test.succeed_without_changes: []
