# bootsecrets golden image: Debian 12 + the bootsecrets agent, its units and the image's
# (non-secret) config; cleaned; `bootsecrets image-check` last, failing the build on findings.
#
# Two sources, one set of provisioners:
#   digitalocean.golden  production snapshot (API token only from the environment)
#   qemu.local           local build from Debian's generic cloud image (TCG by default)
#
#   scripts/build-wheelhouse build/wheelhouse
#   export DIGITALOCEAN_TOKEN=...            # never on the command line, never in a var-file
#   packer init packer/                      # Packer >= 1.7 (plugins.pkr.hcl)
#   packer build -only='digitalocean.golden' -var config_file=packer/demo/config.yaml packer/
# See packer/README.md. Lines marked `# packer>=1.7` are unknown to Debian's packer 1.6.6.

variable "config_file" {
  type        = string
  description = "Path of the image's agent config (installed as /etc/bootsecrets/config.yaml). Not secret: it maps units to secret paths."
}

variable "wheelhouse_dir" {
  type        = string
  default     = "build/wheelhouse"
  description = "Wheelhouse built by scripts/build-wheelhouse (pinned, hashed wheels + the bootsecrets wheel)."
}

variable "install_demo" {
  type        = bool
  default     = false
  description = "Also install the demo application units (packer/demo/), never enabled on their own."
}

variable "digitalocean_token" {
  type        = string
  default     = env("DIGITALOCEAN_TOKEN")
  sensitive   = true
  description = "Only from the environment (DIGITALOCEAN_TOKEN). Never pass it with -var: argv is visible to every local user."
}

variable "snapshot_name" {
  type        = string
  default     = ""
  description = "Name of the resulting DigitalOcean snapshot (default: bootsecrets-debian-12-<UTC timestamp>)."
}

variable "region" {
  type        = string
  default     = "nyc3"
  description = "Region of the temporary build droplet."
}

variable "snapshot_regions" {
  type        = list(string)
  default     = ["nyc3"]
  description = "Regions the snapshot is copied to."
}

variable "size" {
  type        = string
  default     = "s-1vcpu-1gb"
  description = "Droplet size of the temporary build droplet."
}

variable "qemu_image_url" {
  type        = string
  default     = "https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2"
  description = "Base image for the local qemu build."
}

variable "qemu_image_checksum" {
  type        = string
  default     = "file:https://cloud.debian.org/images/cloud/bookworm/latest/SHA512SUMS"
  description = "Checksum (or file:URL of a checksum list) of qemu_image_url."
}

variable "qemu_accelerator" {
  type        = string
  default     = "tcg"
  description = "qemu accelerator: tcg (works everywhere) or kvm."
}

variable "qemu_output_dir" {
  type    = string
  default = "build/packer-qemu"
}

locals {
  # One-off password for the local build's SSH login only; 90-clean.sh replaces every
  # password hash with `*` before the image is saved.
  qemu_build_password = uuidv4()
  repo_root           = "${path.root}/.."
  snapshot_name       = var.snapshot_name != "" ? var.snapshot_name : "bootsecrets-debian-12-${formatdate("YYYYMMDD-hhmmss", timestamp())}"
  # NoCloud seed of the local build VM (cd label `cidata`): password login for Packer only.
  qemu_seed = {
    "meta-data" = "instance-id: packer-build\nlocal-hostname: packer-build\n"
    "user-data" = "#cloud-config\nssh_pwauth: true\npassword: ${local.qemu_build_password}\nchpasswd:\n  expire: false\n"
  }
}

source "digitalocean" "golden" {
  api_token        = var.digitalocean_token
  image            = "debian-12-x64"
  region           = var.region
  size             = var.size
  ssh_username     = "root"
  snapshot_name    = local.snapshot_name
  snapshot_regions = var.snapshot_regions
  droplet_agent    = false # packer>=1.7
  monitoring       = false
  tags             = ["bootsecrets-packer-build"]
}

source "qemu" "local" {
  iso_url          = var.qemu_image_url
  iso_checksum     = var.qemu_image_checksum
  disk_image       = true
  disk_size        = "4G"
  format           = "qcow2"
  accelerator      = var.qemu_accelerator
  headless         = true
  memory           = 1024
  cpus             = 2
  net_device       = "virtio-net"
  disk_interface   = "virtio"
  output_directory = var.qemu_output_dir
  vm_name          = "bootsecrets-debian-12.qcow2"
  cd_label         = "cidata"
  cd_content       = local.qemu_seed # packer>=1.7
  ssh_username     = "debian"
  ssh_password     = local.qemu_build_password
  ssh_timeout      = "20m"
  shutdown_command = "sudo -n systemctl poweroff"
}

build {
  sources = ["source.digitalocean.golden", "source.qemu.local"]

  # Upload targets; tests/e2e/e2e_image.py::upload() copies to exactly the same paths.
  provisioner "shell" {
    inline = ["mkdir -p -m 0700 /tmp/bootsecrets/wheelhouse /tmp/bootsecrets/systemd /tmp/bootsecrets/demo"]
  }
  provisioner "file" {
    source      = "${var.wheelhouse_dir}/"
    destination = "/tmp/bootsecrets/wheelhouse"
  }
  provisioner "file" {
    source      = "${local.repo_root}/systemd/"
    destination = "/tmp/bootsecrets/systemd"
  }
  provisioner "file" {
    source      = "${path.root}/demo/"
    destination = "/tmp/bootsecrets/demo"
  }
  provisioner "file" {
    source      = var.config_file
    destination = "/tmp/bootsecrets/config.yaml"
  }

  # The same scripts the end-to-end test applies to its mmdebstrap tree, in the same order.
  provisioner "shell" {
    scripts = [
      "${path.root}/scripts/10-packages.sh",
      "${path.root}/scripts/20-install-agent.sh",
      "${path.root}/scripts/30-install-config.sh",
      "${path.root}/scripts/90-clean.sh",
      "${path.root}/scripts/99-image-check.sh",
    ]
    environment_vars = ["BOOTSECRETS_INSTALL_DEMO=${var.install_demo ? 1 : 0}"]
    # root on DigitalOcean, the cloud image's sudo-capable user for qemu.
    execute_command = "chmod +x {{ .Path }}; {{ .Vars }} sh -c 'if [ \"$(id -u)\" = 0 ]; then exec sh -eu {{ .Path }}; else exec sudo -n -E sh -eu {{ .Path }}; fi'"
  }
}
