# The droplet's Vault policy: `read` on its secrets and, for its encrypted directories,
# exactly `update` on three Transit paths of its key:
#   datakey/plaintext  a new data key at a directory's first use
#   decrypt            the data key back from its stored ciphertext, at every unlock
#   rewrap             the ciphertext under the key's latest version, after a rotation
# Nothing else: not `read` on the key (the agent learns the latest version from rewrap),
# not `encrypt`, not another key.

locals {
  transit_operations = ["datakey/plaintext", "decrypt", "rewrap"]

  policy = join("\n", concat(
    [for path in var.secret_paths : "path \"${path}\" {\n  capabilities = [\"read\"]\n}\n"],
    var.transit_key == null ? [] : [
      for operation in local.transit_operations :
      "path \"${var.transit_mount}/${operation}/${var.transit_key}\" {\n  capabilities = [\"update\"]\n}\n"
    ],
  ))
}
