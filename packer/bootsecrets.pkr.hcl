# bootsecrets golden image: Debian 12 + the bootsecrets agent, its units and the image's
# (non-secret) config; cleaned; `bootsecrets image-check` last, failing the build on findings.
#
# Two sources, one build (one upload list, one list of provisioning scripts):
#   digitalocean.golden  production snapshot (API token only from the environment)
#   qemu.local           local qcow2 image (TCG by default), from Debian's generic cloud image
#                        or any raw/qcow2 disk with cloud-init (the end-to-end test's)
#
# This file uses nothing newer than Packer 1.6.6 (Debian 12's packer, builders built in):
#   packer build -only=qemu.local -var config_file=... -var qemu_seed_dir=... \
#       -var qemu_ssh_private_key_file=... packer/bootsecrets.pkr.hcl
# Packer >= 1.7 builds the directory, after `packer init packer/` (plugins.pkr.hcl):
#   packer build -only=digitalocean.golden -var config_file=... packer/
# See packer/README.md.

variable "config_file" {
  type        = string
  description = "Path of the image's agent config (installed as /etc/bootsecrets/config.yaml). Not secret: it maps units to secret paths."
}

variable "vault_ca_file" {
  type        = string
  default     = ""
  description = "PEM bundle of the CA(s) that sign Vault's TLS certificate, installed as /etc/bootsecrets/vault-ca.pem (point vault.ca_cert there). Empty: none, the system trust store verifies Vault."
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
  description = "Base disk of the local build: a URL or file:///path of a qcow2/raw disk with cloud-init."
}

variable "qemu_image_checksum" {
  type        = string
  default     = "file:https://cloud.debian.org/images/cloud/bookworm/latest/SHA512SUMS"
  description = "Checksum (or file:URL of a checksum list) of qemu_image_url; \"none\" for a local file you made."
}

variable "qemu_seed_dir" {
  type        = string
  default     = ""
  description = "Directory with the build VM's NoCloud seed, `user-data` and `meta-data` (an SSH key for the image's default user; see README.md). Required by qemu.local."
}

variable "qemu_ssh_username" {
  type        = string
  default     = "debian"
  description = "The image's default (cloud-init) user the build logs in as."
}

variable "qemu_ssh_private_key_file" {
  type        = string
  default     = ""
  description = "Private half of the one-off key in the seed's user-data. Required by qemu.local."
}

variable "qemu_accelerator" {
  type        = string
  default     = "tcg"
  description = "qemu accelerator: tcg (works everywhere) or kvm."
}

variable "qemu_cpu" {
  type        = string
  default     = "max"
  description = "qemu -cpu model: max under TCG, host under KVM."
}

variable "qemu_disk_size" {
  type    = string
  default = "4G"
}

variable "qemu_kernel" {
  type        = string
  default     = ""
  description = "Direct kernel boot for a base disk without a bootloader: the kernel (with qemu_initrd, qemu_append). Empty: boot the disk."
}

variable "qemu_initrd" {
  type    = string
  default = ""
}

variable "qemu_append" {
  type    = string
  default = "root=/dev/vda rw console=ttyS0"
}

variable "qemu_serial_log" {
  type        = string
  default     = "/dev/null"
  description = "Where the build VM's serial console goes (a file; useful when SSH never comes up)."
}

variable "qemu_output_dir" {
  type    = string
  default = "build/packer-qemu"
}

locals {
  repo_root     = "${path.root}/.."
  snapshot_name = var.snapshot_name != "" ? var.snapshot_name : "bootsecrets-debian-12-${formatdate("YYYYMMDD-hhmmss", timestamp())}"
  # The file provisioner needs a source: with no CA bundle, an empty upload (nothing installed).
  vault_ca_upload = var.vault_ca_file != "" ? var.vault_ca_file : "/dev/null"
  # SSH forwarded from the host's loopback only (Packer's default listens on every address).
  qemu_net = [["-netdev", "user,id=user.0,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22"]]
  qemu_direct_boot = [
    ["-kernel", var.qemu_kernel],
    ["-initrd", var.qemu_initrd],
    ["-append", var.qemu_append],
  ]
  qemu_args = concat(
    local.qemu_net,
    [["-cpu", var.qemu_cpu], ["-serial", "file:${var.qemu_serial_log}"], ["-device", "virtio-rng-pci"]],
    var.qemu_kernel != "" ? local.qemu_direct_boot : [],
  )
}

source "digitalocean" "golden" {
  api_token        = var.digitalocean_token
  image            = "debian-12-x64"
  region           = var.region
  size             = var.size
  ssh_username     = "root"
  snapshot_name    = local.snapshot_name
  snapshot_regions = var.snapshot_regions
  monitoring       = false
  tags             = ["bootsecrets-packer-build"]
  # DigitalOcean's droplet agent (`droplet_agent = false` needs Packer >= 1.7) is purged
  # by 90-clean.sh; image-check fails the build if /opt/digitalocean is left.
}

source "qemu" "local" {
  iso_url        = var.qemu_image_url
  iso_checksum   = var.qemu_image_checksum
  disk_image     = true
  disk_size      = var.qemu_disk_size
  format         = "qcow2"
  accelerator    = var.qemu_accelerator
  headless       = true
  memory         = 1024
  cpus           = 2
  net_device     = "virtio-net"
  disk_interface = "virtio"
  disk_cache     = "unsafe"
  # 90-clean.sh zeroes the free space; qemu turns the zeros into holes of the qcow2.
  disk_discard       = "unmap"
  disk_detect_zeroes = "unmap"
  qemuargs           = local.qemu_args
  output_directory   = var.qemu_output_dir
  vm_name            = "bootsecrets-debian-12.qcow2"
  # NoCloud seed on a CD labelled `cidata`: only the build's one-off SSH key.
  cd_files             = ["${var.qemu_seed_dir}/user-data", "${var.qemu_seed_dir}/meta-data"]
  cd_label             = "cidata"
  ssh_username         = var.qemu_ssh_username
  ssh_private_key_file = var.qemu_ssh_private_key_file
  ssh_timeout          = "20m"
  shutdown_command     = "sudo -n systemctl poweroff"
}

build {
  sources = ["source.digitalocean.golden", "source.qemu.local"]

  # The upload list: each destination is read by a script below (tests/e2e/test_packer.py
  # checks both directions).
  provisioner "shell" {
    inline        = ["mkdir -p -m 0700 /tmp/bootsecrets/wheelhouse /tmp/bootsecrets/systemd /tmp/bootsecrets/demo"]
    remote_folder = "/dev/shm"
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
  provisioner "file" {
    source      = local.vault_ca_upload
    destination = "/tmp/bootsecrets/vault-ca.pem"
  }

  provisioner "shell" {
    scripts = [
      "${path.root}/scripts/10-packages.sh",
      "${path.root}/scripts/15-root-fs.sh",
      "${path.root}/scripts/20-install-agent.sh",
      "${path.root}/scripts/30-install-config.sh",
      "${path.root}/scripts/90-clean.sh",
      "${path.root}/scripts/99-image-check.sh",
    ]
    environment_vars = ["BOOTSECRETS_INSTALL_DEMO=${var.install_demo ? 1 : 0}"]
    # Packer's copy of each script goes to memory, not /tmp: image-check finds leftovers there.
    remote_folder = "/dev/shm"
    # root on DigitalOcean, the cloud image's sudo-capable user for qemu.
    execute_command = "chmod +x {{ .Path }}; {{ .Vars }} sh -c 'if [ \"$(id -u)\" = 0 ]; then exec sh -eu {{ .Path }}; else exec sudo -n -E sh -eu {{ .Path }}; fi'"
  }
}
