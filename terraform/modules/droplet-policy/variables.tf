variable "secret_paths" {
  description = "Vault API paths the droplet may read, e.g. [\"secret/data/app/*\"]."
  type        = list(string)
}

variable "transit_mount" {
  description = "Path of the Transit secrets engine holding the droplet's key."
  type        = string
  default     = "transit"

  validation {
    condition     = can(regex("^[A-Za-z0-9_.@=+-]+(/[A-Za-z0-9_.@=+-]+)*$", var.transit_mount))
    error_message = "transit_mount must be a mount path like transit or transit/team."
  }
}

variable "transit_key" {
  description = "Name of the Transit key that wraps the droplet's data keys (null: no data at rest, no Transit paths)."
  type        = string
  default     = null

  validation {
    condition     = var.transit_key == null ? true : can(regex("^[A-Za-z0-9_.@=+-]+$", var.transit_key))
    error_message = "transit_key must be one Transit key name (letters, digits, _.@=+-), not a path."
  }
}

variable "volume_transit_keys" {
  description = "Transit keys of the droplet's encrypted volumes (one per volume: its LUKS2 keyslot's data key is wrapped by it), granted the same three paths as transit_key."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for key in var.volume_transit_keys : can(regex("^[A-Za-z0-9_.@=+-]+$", key))])
    error_message = "volume_transit_keys must be Transit key names (letters, digits, _.@=+-), not paths."
  }
}
