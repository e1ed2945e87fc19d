terraform {
  required_version = ">= 1.3"

  required_providers {
    vault = {
      source  = "hashicorp/vault"
      version = "~> 4.5"
    }
    digitalocean = {
      source  = "digitalocean/digitalocean"
      version = "~> 2.44"
    }
  }
}

# Credentials come from the environment only, never from files in this repository:
#   VAULT_ADDR, VAULT_TOKEN (or a Vault CLI token helper) for the vault provider;
#   DIGITALOCEAN_TOKEN for the digitalocean provider.
provider "vault" {}

provider "digitalocean" {}
