include:
  - extend_requisite.base
extend:
  base_svc:
    test:
      - require:
        - test: local_conf
local_conf:
  test.succeed_with_changes: []
