"""Small image configs for tests that need one that parses, not a particular one."""

#: One secret, two units; append an `encrypted_directories:`/`encrypted_volumes:` section
#: naming app.service or db.service.
MINIMAL = """\
vault: {address: "https://vault.example.com:8200"}
approle: {role: web}
reboot_policy: reprovision
mounts: {secret: kv-v2}
secrets: {a: secret/app/a}
services:
  app.service:
    environment: {A: "{{ secrets.a.x }}"}
  db.service:
    environment: {A: "{{ secrets.a.x }}"}
"""
