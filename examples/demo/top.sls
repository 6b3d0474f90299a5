# Which states each node gets when `eden apply` names none.
base:
  '*':
    - motd
    - token
