include:
  - sls_requisite.lib
top_state:
  test.succeed_without_changes:
    - require:
      - sls: sls_requisite.lib
