variable "name" {
  description = "Droplet name; also names the AppRole role and its policy."
  type        = string
}

variable "snapshot_id" {
  description = "ID of the golden-image snapshot built by packer/ (numeric, as a string)."
  type        = string
}

variable "region" {
  description = "DigitalOcean region slug, e.g. fra1."
  type        = string
}

variable "size" {
  description = "Droplet size slug."
  type        = string
  default     = "s-1vcpu-1gb"
}

variable "vpc_uuid" {
  description = "VPC to place the droplet in (null: the region's default VPC)."
  type        = string
  default     = null
}

variable "ssh_key_ids" {
  description = "IDs or fingerprints of SSH keys registered with DigitalOcean."
  type        = list(string)
  default     = []
}

variable "ssh_authorized_keys" {
  description = "Extra SSH public keys delivered through user-data (prefer ssh_key_ids)."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Droplet tags."
  type        = list(string)
  default     = []
}

variable "vault_addr" {
  description = "Vault/OpenBao address as the droplet reaches it (written to the bootstrap). Null: the image config's address."
  type        = string
  default     = null
}

variable "approle_mount" {
  description = "Path of the AppRole auth method (already enabled in Vault)."
  type        = string
  default     = "approle"
}

variable "secret_paths" {
  description = "Vault API paths the droplet may read, e.g. [\"secret/data/app/*\"] for KV v2 or [\"database/creds/app\"]."
  type        = list(string)
}

variable "secret_id_ttl" {
  description = "Seconds a (single-use) secret-id stays valid once unwrapped. It is used within seconds of the unwrap at first boot."
  type        = number
  default     = 3600
}

variable "wrapping_ttl" {
  description = "How long the wrapped secret-id can be unwrapped: long enough for the droplet to be created and boot. After it, the agent reports it expired and a new one must be minted."
  type        = string
  default     = "30m"
}

variable "token_period" {
  description = "Period (seconds) of the droplet's Vault token: renewable forever while renewed within it, revocable at any time. Used by the persist-token reboot policy."
  type        = number
  default     = 86400
}

variable "token_bound_cidrs" {
  description = "CIDRs the droplet's token (and its login) may be used from, e.g. the VPC's range or the droplet's NAT egress. Empty: not bound."
  type        = list(string)
  default     = []
}

variable "transit_mount" {
  description = "Path of the Transit secrets engine (already enabled) for the keys of encrypted directories."
  type        = string
  default     = "transit"
}

variable "shared_transit_key" {
  description = "Name of an existing Transit key shared by several droplets (set `transit_key` to it in the image config). Null: a key per droplet, bootsecrets-<name>, is created. Deleting a shared key shreds every droplet's data under it at once."
  type        = string
  default     = null
}

variable "transit_min_decryption_version" {
  description = "The per-droplet Transit key's min_decryption_version: raise it after a rotation once every droplet has rewrapped (status --json: directories[].key_version)."
  type        = number
  default     = 1
}

variable "volumes" {
  description = "Block volumes to create unformatted and attach, for the image config's encrypted_volumes: DigitalOcean volume name => size in GiB. Each gets its own Transit key bootsecrets-volume-<name> (the config's transit_key); its device is /dev/disk/by-id/scsi-0DO_Volume_<name>."
  type        = map(number)
  default     = {}

  validation {
    condition     = alltrue([for name, size in var.volumes : can(regex("^[a-z][a-z0-9-]{0,63}$", name)) && size >= 1 && floor(size) == size])
    error_message = "volumes: names are lower-case letters, digits and '-', starting with a letter, at most 64 (DigitalOcean's rule); sizes are whole GiB, at least 1."
  }
}
