# Plugins for Packer >= 1.7: `packer init packer/` installs them (once, needs network).
#
# Kept in a file of its own because Debian 12's packer (1.6.6, builders built in) does not
# know `required_plugins`: with 1.6.6, give the template file explicitly
# (`packer validate packer/bootsecrets.pkr.hcl`), which never reads this file. See README.md.
packer {
  required_version = ">= 1.7.0"
  required_plugins {
    digitalocean = {
      # >= 1.1.0: `droplet_agent`
      version = ">= 1.1.0"
      source  = "github.com/digitalocean/digitalocean"
    }
    qemu = {
      version = ">= 1.0.9"
      source  = "github.com/hashicorp/qemu"
    }
  }
}
