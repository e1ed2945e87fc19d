# The droplet's cloud-init user-data: a #cloud-config that writes the bootsecrets bootstrap
# (role-id, wrapped secret-id, Vault address) to /run/bootsecrets/bootstrap.yaml, root 0600,
# on the memory-only store. The template lives with the other cloud-init files of the
# project; tests render it through this very module.

locals {
  template = "${path.module}/../../../cloud-init/user-data.yaml.tftpl"

  user_data = templatefile(local.template, {
    vault_addr          = var.vault_addr
    role_id             = var.role_id
    wrapped_secret_id   = var.wrapped_secret_id
    ssh_authorized_keys = var.ssh_authorized_keys
  })

  # length() counts characters; DigitalOcean's limit is in bytes. base64 of the UTF-8 bytes
  # has 4 characters per 3 bytes, less one per padding "=". A size says nothing about the
  # wrapped secret-id inside, so it may be shown (plans, the precondition's message).
  user_data_base64 = base64encode(local.user_data)
  user_data_bytes  = nonsensitive(length(local.user_data_base64) / 4 * 3 - length(regexall("=", local.user_data_base64)))

  # DigitalOcean rejects droplet user-data larger than 64 KiB.
  user_data_limit = 65536
}
