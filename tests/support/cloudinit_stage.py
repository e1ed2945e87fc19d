"""Run cloud-init's own init-stage code against a throwaway root (Debian's cloud-init package).

Run with the system Python that has cloud-init (`/usr/bin/python3`), not the test venv:

    /usr/bin/python3 cloudinit_stage.py first-boot ROOT SEED_DIR
    /usr/bin/python3 cloudinit_stage.py next-boot ROOT
    /usr/bin/python3 cloudinit_stage.py query ROOT

`first-boot` does what `cloud-init init` does with a NoCloud seed on an instance's first boot,
with every path under ROOT: fetch the datasource (user-data + meta-data from SEED_DIR), link
the instance directory, store the raw and processed user-data, pickle the datasource to
`obj.pkl` and consume the user-data (`cloud-config.txt`). `next-boot` is the init stage of the
same instance's next boot: the datasource comes back from `obj.pkl`, and the user-data files
are written again from it. `query` prints, as JSON, what cloud-init would work with: the raw
user-data from the cached datasource (decompressed by cloud-init if it came gzip-compressed),
its processed parts, and the merged cloud-config.

No write may land outside ROOT: `util.write_file` is guarded (the stage code falls back to
/var/lib/cloud when its configuration is re-read).
"""

from __future__ import annotations

import json
import sys
from typing import Any

# The system Python's cloud-init (Debian's package), not installed in the test venv.
from cloudinit import stages, util  # type: ignore[import-not-found]
from cloudinit.sources import DataSourceNoCloud  # type: ignore[import-not-found]


def _guard(root: str) -> None:

    original = util.write_file

    def write_file(filename: Any, *args: Any, **kwargs: Any) -> Any:
        if not str(filename).startswith(root + "/"):
            raise SystemExit(f"cloud-init tried to write outside the test root: {filename}")
        return original(filename, *args, **kwargs)

    util.write_file = write_file


def _init(root: str, seed: str | None) -> Any:

    cfg: dict[str, Any] = {
        "system_info": {
            "distro": "debian",
            "paths": {
                "cloud_dir": f"{root}/var/lib/cloud",
                "run_dir": f"{root}/run/cloud-init",
                "templates_dir": "/etc/cloud/templates",
            },
        },
        "datasource_list": ["NoCloud"],
    }
    if seed is not None:
        cfg["datasource"] = {"NoCloud": {"seedfrom": f"file://{seed.rstrip('/')}/"}}
    init = stages.Init(ds_deps=[])
    init._cfg = cfg
    init._read_cfg = lambda extra_fns=None: cfg  # _reset() re-reads the configuration
    return init


def first_boot(root: str, seed: str) -> None:
    init = _init(root, seed)
    util.ensure_dirs(init._initial_subdirs())
    datasource = DataSourceNoCloud.DataSourceNoCloud(init.cfg, init.distro, init.paths)
    if not datasource.get_data():
        raise SystemExit(f"NoCloud found no data in {seed}")
    init.datasource = datasource
    init._paths = None  # the instance directory comes from the datasource
    init.instancify()
    init.update()
    init._write_to_cache()
    init.consume_data()


def next_boot(root: str) -> None:
    init = _init(root, None)
    datasource = init._restore_from_cache()
    if datasource is None:
        raise SystemExit("no cached datasource (obj.pkl) to restore")
    init.datasource = datasource
    init._paths = None
    init.instancify()
    init.update()
    init._write_to_cache()


def query(root: str) -> dict[str, Any]:

    init = _init(root, None)
    datasource = init._restore_from_cache()
    if datasource is None:
        raise SystemExit("no cached datasource (obj.pkl) to restore")
    raw = datasource.get_userdata_raw()
    compressed = isinstance(raw, bytes) and raw.startswith(b"\x1f\x8b")
    if compressed:  # cloud-init's own decompression, as its user-data processor does
        raw = util.decomp_gzip(raw, quiet=False)
    parts = [
        part.get_payload(decode=True).decode("utf-8")
        for part in datasource.get_userdata().walk()
        if not part.is_multipart()
    ]
    config_path = f"{root}/var/lib/cloud/instance/cloud-config.txt"
    return {
        "instance_id": datasource.get_instance_id(),
        "userdata_raw": raw.decode("utf-8") if isinstance(raw, bytes) else raw,
        "userdata_raw_gzip": compressed,
        "parts": parts,
        "cloud_config": util.load_yaml(util.load_file(config_path)),
    }


def main(argv: list[str]) -> int:
    command, root = argv[0], argv[1].rstrip("/")
    _guard(root)
    if command == "first-boot":
        first_boot(root, argv[2])
    elif command == "next-boot":
        next_boot(root)
    elif command == "query":
        print(json.dumps(query(root)))
    else:
        raise SystemExit(f"unknown command {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
