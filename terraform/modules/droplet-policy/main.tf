# The droplet's Vault policy: `read` on its secrets and, for its encrypted directories and
# volumes, exactly `update` on three Transit paths of each key (its own key, and one per
# encrypted volume):
#   datakey/plaintext  a new data key at a directory's or volume's first use
#   decrypt            the data key back from its stored ciphertext, at every unlock
#   rewrap             the ciphertext under the key's latest version, after a rotation
# Nothing else: not `read` on a key (the agent learns the latest version from rewrap),
# not `encrypt`, not another key.

locals {
  transit_operations = ["datakey/plaintext", "decrypt", "rewrap"]
  transit_keys       = distinct(concat(var.transit_key == null ? [] : [var.transit_key], var.volume_transit_keys))

  policy = join("\n", concat(
    [for path in var.secret_paths : "path \"${path}\" {\n  capabilities = [\"read\"]\n}\n"],
    flatten([
      for key in local.transit_keys : [
        for operation in local.transit_operations :
        "path \"${var.transit_mount}/${operation}/${key}\" {\n  capabilities = [\"update\"]\n}\n"
      ]
    ]),
  ))
}
