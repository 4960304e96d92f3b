# The appliance's VM image (issue 15), stage 2: Packer boots the stage-1 disk
# (packer/rootfs-disk.sh: debootstrap, kernel, extlinux) over SSH with a build-only key, installs
# the appliance's venv (built natively by packer/build-venv.sh), its systemd units, first-boot
# and seed handling and the firewall, checks the sandbox under the worker's systemd hardening,
# and removes the build key, the SSH host keys and the machine-id. packer/build.sh runs it all.
#
# Written for Debian's Packer 1.6.6 (the only one reachable here): no `required_plugins` block
# and no `packer init`. A newer Packer needs the qemu plugin first:
#   packer plugins install github.com/hashicorp/qemu

variable "base_image" {
  type        = string
  description = "The stage-1 qcow2 (packer/rootfs-disk.sh)."
}

variable "build_key" {
  type        = string
  description = "The stage-1 disk's build-only SSH key for root (removed from the image)."
}

variable "venv_tar" {
  type        = string
  description = "The appliance's venv for /opt/appliance (packer/build-venv.sh)."
}

variable "image_version" {
  type        = string
  description = "This image's version (PEP 440), stamped in /etc/appliance/image.env."
}

variable "accelerator" {
  type        = string
  default     = "tcg"
  description = "QEMU accelerator: tcg here (KVM guests hang on this machine kind), kvm on a real host."
}

variable "output_directory" {
  type    = string
  default = "output"
}

variable "vm_name" {
  type    = string
  default = "appliance.qcow2"
}

variable "disk_size" {
  type        = string
  default     = "4096M"
  description = "The stage-1 disk's size; the image is not resized (skip_resize_disk)."
}

variable "serial_log" {
  type    = string
  default = "/dev/null"
}

source "qemu" "appliance" {
  disk_image       = true
  iso_url          = var.base_image
  iso_checksum     = "none"
  accelerator      = var.accelerator
  format           = "qcow2"
  headless         = true
  memory           = 1536
  cpus             = 2
  disk_size        = var.disk_size
  skip_resize_disk = true
  disk_interface   = "virtio"
  # provision.sh ends with fstrim: the blocks of deleted files are punched out of the image.
  disk_discard = "unmap"
  net_device       = "virtio-net"
  # Packer's own netdev forwards SSH on 0.0.0.0: this one keeps the build VM on 127.0.0.1.
  qemuargs = [
    ["-netdev", "user,id=user.0,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22"],
    ["-cpu", "max"],
    ["-serial", "file:${var.serial_log}"],
  ]
  communicator         = "ssh"
  ssh_username         = "root"
  ssh_private_key_file = var.build_key
  ssh_timeout          = "10m"
  shutdown_command     = "systemctl poweroff"
  output_directory     = var.output_directory
  vm_name              = var.vm_name
}

build {
  sources = ["source.qemu.appliance"]

  provisioner "shell" {
    inline = ["install -d -m 0700 /tmp/appliance-units /tmp/appliance-guest"]
  }

  provisioner "file" {
    source      = var.venv_tar
    destination = "/tmp/appliance-venv.tar"
  }

  provisioner "file" {
    source      = "${path.root}/units/"
    destination = "/tmp/appliance-units"
  }

  provisioner "file" {
    source      = "${path.root}/guest/"
    destination = "/tmp/appliance-guest"
  }

  provisioner "shell" {
    script           = "${path.root}/provision.sh"
    environment_vars = ["IMAGE_VERSION=${var.image_version}"]
  }
}
