variable "vault_addr" {
  description = "Vault/OpenBao address the droplet's agent talks to, e.g. https://vault.example.com:8200. Null leaves it to the image config."
  type        = string
  default     = null

  validation {
    condition     = var.vault_addr == null ? true : can(regex("^https?://[A-Za-z0-9._~\\[\\]:-]+/?$", var.vault_addr))
    error_message = "vault_addr must be scheme://host[:port] (https://, or http:// for a loopback test server) with no path, query or credentials."
  }
}

variable "role_id" {
  description = "The AppRole role-id (not secret on its own)."
  type        = string

  validation {
    condition     = length(var.role_id) <= 1024 && can(regex("^[!-~]+$", var.role_id))
    error_message = "role_id must be an AppRole role-id: 1 to 1024 printable ASCII characters, no spaces or line breaks."
  }
}

variable "wrapped_secret_id" {
  description = "The response-wrapping token around a single-use secret-id (vault_approle_auth_backend_role_secret_id.wrapping_token)."
  type        = string
  sensitive   = true

  validation {
    condition     = length(var.wrapped_secret_id) <= 1024 && can(regex("^[!-~]+$", var.wrapped_secret_id))
    error_message = "wrapped_secret_id must be a wrapping token: 1 to 1024 printable ASCII characters, no spaces or line breaks. Pass the wrapping_token of a vault_approle_auth_backend_role_secret_id created with wrapping_ttl."
  }
}

variable "ssh_authorized_keys" {
  description = "SSH public keys for the image's default user (cloud-init's top-level ssh_authorized_keys). On DigitalOcean prefer the droplet's ssh_keys."
  type        = list(string)
  default     = []
  nullable    = false

  validation {
    condition     = alltrue([for key in var.ssh_authorized_keys : length(regexall("[\\x{0}-\\x{1f}\\x{7f}-\\x{9f}]", key)) == 0])
    error_message = "Each entry of ssh_authorized_keys must be one public key on one line, without control characters."
  }
}
