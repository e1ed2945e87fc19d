# Example: one droplet from the secret-free golden image, with first-boot secrets from Vault.
#
# Vault side: a policy (read on the secrets, `update` on three Transit paths of each of the
# droplet's keys), a Transit key for its encrypted directories and one per encrypted volume,
# an AppRole role whose secret-ids are single-use, and one secret-id minted response-wrapped
# (only the wrapping token reaches the droplet, in its user-data). DigitalOcean side: the
# droplet, from the snapshot, with that user-data, and its block volumes, unformatted.

# The Transit key that wraps the data keys of the droplet's encrypted directories: its own by
# default, named like its AppRole role (the image config's default `transit_key`), or a key
# shared by a fleet (var.shared_transit_key, created elsewhere). Deleting it crypto-shreds the
# data of every droplet under it, snapshots and backups included (docs/operations.md).
resource "vault_transit_secret_backend_key" "droplet" {
  count = var.shared_transit_key == null ? 1 : 0

  backend = var.transit_mount
  name    = "bootsecrets-${var.name}"

  # Without it Vault refuses to delete the key, and `terraform destroy` could not shred.
  deletion_allowed = true
  # The key never leaves Vault: no export, no plaintext backup.
  exportable             = false
  allow_plaintext_backup = false
  # Raise after a rotation, once every droplet's `bootsecrets status` shows the new version.
  min_decryption_version = var.transit_min_decryption_version
}

locals {
  transit_key = var.shared_transit_key != null ? var.shared_transit_key : vault_transit_secret_backend_key.droplet[0].name
}

# Block volumes for the image config's `encrypted_volumes`: the agent puts LUKS2 on each at
# first boot, with a data key wrapped by the volume's own Transit key below, and keeps the
# wrapped key in the volume's LUKS2 header. Created WITHOUT initial_filesystem_type (and
# initial_filesystem_label): DigitalOcean would format the volume and mount it at boot, and
# bootsecrets never formats over a filesystem (exit 55). A new volume reads as zeros: the
# agent's "provably blank". The device in the image config is
# /dev/disk/by-id/scsi-0DO_Volume_<name> (output volume_devices).
resource "digitalocean_volume" "encrypted" {
  for_each = var.volumes

  region      = var.region
  name        = each.key
  size        = each.value
  description = "bootsecrets encrypted volume of ${var.name}: LUKS2, key wrapped by Vault Transit key bootsecrets-volume-${each.key}"
}

# One Transit key per volume: the volume can move to another droplet (grant that droplet
# this key), and deleting the key crypto-shreds this volume alone, its snapshots and any
# LUKS header backup included.
resource "vault_transit_secret_backend_key" "volume" {
  for_each = var.volumes

  backend = var.transit_mount
  name    = "bootsecrets-volume-${each.key}"

  deletion_allowed       = true
  exportable             = false
  allow_plaintext_backup = false
  min_decryption_version = var.transit_min_decryption_version
}

module "policy" {
  source = "./modules/droplet-policy"

  secret_paths        = var.secret_paths
  transit_mount       = var.transit_mount
  transit_key         = local.transit_key
  volume_transit_keys = [for key in vault_transit_secret_backend_key.volume : key.name]
}

resource "vault_policy" "droplet" {
  name   = "bootsecrets-${var.name}"
  policy = module.policy.policy
}

resource "vault_approle_auth_backend_role" "droplet" {
  backend        = var.approle_mount
  role_name      = "bootsecrets-${var.name}"
  token_policies = [vault_policy.droplet.name]

  # One login per secret-id: a copy of the user-data read later (cloud-init keeps one on
  # the droplet, the metadata service serves it for the droplet's life) is worthless.
  secret_id_num_uses = 1
  secret_id_ttl      = var.secret_id_ttl

  # A periodic token: renewed by the agent, never expires while renewed, revocable.
  token_period      = var.token_period
  token_bound_cidrs = length(var.token_bound_cidrs) > 0 ? var.token_bound_cidrs : null
}

resource "vault_approle_auth_backend_role_secret_id" "droplet" {
  backend   = var.approle_mount
  role_name = vault_approle_auth_backend_role.droplet.role_name

  # Response-wrapped: Terraform (and its state) only ever holds the wrapping token, which can
  # be unwrapped exactly once, within wrapping_ttl. The agent checks its creation path and
  # reports a token that was already unwrapped (possible interception).
  wrapping_ttl = var.wrapping_ttl

  metadata = jsonencode({
    droplet = var.name
  })
}

module "user_data" {
  source = "./modules/user-data"

  vault_addr          = var.vault_addr
  role_id             = vault_approle_auth_backend_role.droplet.role_id
  wrapped_secret_id   = vault_approle_auth_backend_role_secret_id.droplet.wrapping_token
  ssh_authorized_keys = var.ssh_authorized_keys
}

resource "digitalocean_droplet" "app" {
  name     = var.name
  image    = var.snapshot_id
  region   = var.region
  size     = var.size
  vpc_uuid = var.vpc_uuid
  ssh_keys = var.ssh_key_ids
  tags     = var.tags

  user_data = module.user_data.user_data

  # Attached at creation, so each volume is there when the agent first boots (it waits
  # attach_timeout for a device, then leaves the units needing it down).
  volume_ids = [for volume in digitalocean_volume.encrypted : volume.id]

  lifecycle {
    # The wrapped secret-id is single-use. Once the droplet has unwrapped it, the vault
    # provider sees the wrapping token gone and mints a new secret-id, which changes the
    # rendered user-data; DigitalOcean cannot change user-data in place, so without this
    # every later plan would destroy and re-create the droplet. See README.md.
    ignore_changes = [user_data]
  }
}
