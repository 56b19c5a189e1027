"""imagectl's test harness around fakepve: a fake Proxmox VE API for the publish/images/gc tests.

fakepve (PyPI `fakepve[crypto]`, AGPL-3.0) is installed into a virtualenv by `.ci/run` and imported
here; nothing of it is vendored or copied. This file only subclasses `FakePve` where fakepve 0.5.0
answers differently from the PVE documentation (pve-storage, qemu-server), and adds a loopback
control channel so the Rust tests (`tests/src/fakepve.rs`) can inject faults and read state.

Run:  python harness.py [--time-scale 0]
It prints one JSON line on stdout once both servers listen:
    {"port", "control_port", "fingerprint", "ca_file", "token", "workdir"}
and exits when its stdin is closed (the Rust wrapper holds the pipe), or on SIGTERM.

Control commands added for timing: `task-secs` {TYPE: PVE seconds} makes every task of a type
take that long (scaled by the time scale), so benchmarks see realistic clone/start/upload times.

Where fakepve 0.5.0 differs from the PVE docs, and what this subclass does about it:
* upload accepts only content=iso/vztmpl although the PVE 9 schema allows `import`: we accept
  `import` with PVE's filename rule (SAFE_CHAR_CLASS + .qcow2|.raw|.vmdk|.ova, else 400
  "invalid filename or wrong extension").
* upload reads the whole body into memory (64 MiB client_max_size): we stream the multipart body
  to a sparse temp file `pveupload-*` in 1 MiB chunks, as pveproxy does (memory stays flat).
* upload ignores `checksum`: the imgcopy task verifies it and fails with PVE's
  "checksum mismatch" (temp file removed, nothing stored).
* import volumes are not inspected: a qcow2 with a backing file fails the task, as
  `file_size_info(..., untrusted)` does in PVE; the qcow2 virtual size is kept for import-from.
* `scsi0=STORE:0,import-from=VOL` allocates 0 bytes and keeps `import-from` in the config: we size
  the new disk from the source's virtual size, fail the create task with qemu-server's
  "could not get size of VOL" if the source does not exist, and drop `import-from` from the
  stored config, as qemu-server does.
* upload and download-url store the file under the name sent: we store it under
  `normalize_content_filename` of it (every character outside [a-zA-Z0-9_.-] becomes `_`, so
  `x-2.0+b1.qcow2` is `import/x-2.0_b1.qcow2`), as pve-storage does; the upload record keeps
  both names (`filename` stored, `sent_filename` sent).
* download-url pretends (no fetch): we fetch the URL (loopback http(s) in tests) into a temp file,
  verify the checksum and the image as upload does.
* the `local` storage lacks `import` in its content list: added.
* Storage volumes are cluster-wide in fakepve even for non-shared storages (PVE keeps them per
  node); tests publish to nodes one after another, so this does not matter for them.

What the harness adds for tests (none of it is PVE behaviour; it is how tests look inside):
* ISO bytes are kept: fakepve stores only a volume's size. An uploaded or downloaded `iso` volume is
  also saved as `<workdir>/isos/<storage>/<filename>` (the imgcopy task's temp file, moved), and that
  file goes when the volume is deleted (after every `imgdel` task, and whenever the state is read).
  The guest emulation (`tests/src/pve_guest.rs`) reads seed ISOs from there.
* `GET /state` on the control port: VMs (with `status`), volumes (with `path` of a kept ISO),
  tasks, uploads, nodes and the requests seen.
* Control commands (`POST /<cmd>` with a JSON body, `control.py`): `fail`, `fail-task`,
  `clear-failures`, `node`, `storage`, `token`, `vm`, `time-scale`, `task-secs`, `version` (what
  `GET /version` reports), `grant` (an ACL entry: after the first one every call is checked), and `agent` {vmid, files: {path: text} | null,
  hangs?: bool}: sets the VM's guest agent (`vm.agent = {'files': files}`, so `agent/file-read`
  answers those files; null: "QEMU guest agent is not running"; hangs: the agent times out).
"""

import argparse
import asyncio
import contextvars
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import struct
import sys
import tempfile
import threading

import aiohttp
from aiohttp import web
from fakepve import FakePve, PveError, TaskError
from fakepve.lxc import format_size
from fakepve.qemu import NEW_DISK, join_drive, split_drive, volume_ref
from fakepve.routing import split_list

from control import control_app
from pki import make_pki

# The node a clone request runs on while fakepve's clone handler checks the new id (see _qm_clone).
_CLONE_NODE = contextvars.ContextVar('clone_node', default=None)

CHUNK = 1 << 20
SAFE_IMPORT_NAME = re.compile(r'^[a-zA-Z0-9\-.+=_]+\.(ova|qcow2|raw|vmdk)$')
HASHES = {'md5': 'md5', 'sha1': 'sha1', 'sha224': 'sha224', 'sha256': 'sha256', 'sha384': 'sha384',
          'sha512': 'sha512'}
ZERO = bytes(CHUNK)


def normalize_content_filename(filename):
    """The name PVE stores an upload or download-url file under: pve-storage src/PVE/Storage.pm
    `normalize_content_filename` (chomp, drop everything up to the last / or \\, every character
    outside [a-zA-Z0-9_.-] becomes _), which `upload` and `download_url` in
    src/PVE/API2/Storage/Status.pm apply before they check the extension and build the path."""
    if filename.endswith('\n'):
        filename = filename[:-1]
    filename = re.split(r'[/\\]', filename)[-1]
    return re.sub(r'[^a-zA-Z0-9_.-]', '_', filename)


def inspect_image(path, filename):
    """(virtual size, error or None) of an uploaded import image, as PVE's untrusted file_size_info sees it."""
    if not filename.endswith('.qcow2'):
        return os.path.getsize(path), None
    with open(path, 'rb') as fh:
        head = fh.read(72)
    if len(head) < 72 or head[:4] != b'QFI\xfb':
        return 0, "'{0}' is not a valid qcow2 image".format(filename)
    backing_offset, = struct.unpack('>Q', head[8:16])
    size, = struct.unpack('>Q', head[24:32])
    if backing_offset:
        return size, "image '{0}' has a backing file - backing file not allowed".format(filename)
    return size, None


class ImagectlPve(FakePve):
    """FakePve with import uploads as the PVE docs describe them, in-task faults and a control view."""

    def __init__(self, workdir, **kwargs):
        super().__init__(**kwargs)
        self.workdir = workdir
        # (method, suffix) -> {'message', 'times'}: requests answered with a UPID whose task fails.
        self.task_failures = {}
        # One record per finished upload: filename, bytes received, status.
        self.uploads = []
        self.storages['local']['content'] = 'iso,vztmpl,backup,snippets,import'

    # ------------------------------------------------------------ upload

    async def _read_body(self, request):
        # The upload handler streams its own body; every other request is read whole, as before.
        if request.method == 'POST' and request.path.endswith('/upload'):
            return b''
        return await super()._read_body(request)

    async def _answer(self, request, handler, generic, path_node):
        for key, rule in list(self.task_failures.items()):
            if request.method != key[0] or not request.path.endswith(key[1]):
                continue
            if rule['times'] is not None:
                rule['times'] -= 1
                if rule['times'] <= 0:
                    del self.task_failures[key]
            return web.json_response({'data': await self._failing_task(request, path_node, rule['message'],
                                                                        rule.get('delay', 0))})
        return await super()._answer(request, handler, generic, path_node)

    async def _failing_task(self, request, path_node, message, delay=0):
        from fakepve.server import USER
        node = path_node if path_node in self.nodes else sorted(self.nodes)[0]
        vmid = request.match_info.get('vmid', '')
        if not vmid:
            found = re.search(r'/qemu/(\d+)', request.path)
            vmid = found.group(1) if found else ''

        async def body():
            if delay:
                await asyncio.sleep(delay)  # real seconds: a task that runs long, then fails
            raise TaskError(message)
        return await self.task(node, request.path.rstrip('/').rsplit('/', 1)[-1], vmid,
                               request[USER] or 'root@pam', body)

    async def _upload(self, request):
        from fakepve.server import USER
        node = request.match_info['node']
        name, store = self._file_storage(request, 'upload')
        user = request[USER]
        self.require(user, '/storage/' + name, 'Datastore.AllocateTemplate')
        if request.content_type != 'multipart/form-data':
            raise PveError(400, 'bad upload request: not multipart/form-data')
        if request.content_length is None:
            raise PveError(411, 'Length Required: upload without Content-Length')
        fields, tmp, received, hasher = {}, None, 0, None
        try:
            reader = await request.multipart()
            while True:
                part = await reader.next()
                if part is None:
                    break
                if part.filename is None:
                    fields[part.name] = (await part.read(decode=False)).decode()
                    continue
                fields['filename'] = part.filename
                algo = HASHES.get(fields.get('checksum-algorithm', ''))
                hasher = hashlib.new(algo) if algo else None
                fd, tmp = tempfile.mkstemp(prefix='pveupload-', dir=self.workdir)
                with os.fdopen(fd, 'wb') as out:
                    while True:
                        chunk = await part.read_chunk(CHUNK)
                        if not chunk:
                            break
                        received += len(chunk)
                        if hasher:
                            hasher.update(chunk)
                        if len(chunk) == CHUNK and chunk == ZERO:
                            out.seek(len(chunk), os.SEEK_CUR)  # sparse: a zero MiB costs no disk
                        else:
                            out.write(chunk)
                    out.truncate()
        except (ValueError, AssertionError, aiohttp.ClientPayloadError) as e:
            self._drop(tmp)
            raise PveError(400, 'bad upload request: {0}'.format(e)) from None
        content = fields.get('content')
        sent = fields.get('filename', '')
        filename = normalize_content_filename(sent)
        record = {'filename': filename, 'sent_filename': sent, 'bytes': received, 'storage': name, 'node': node,
                  'status': 'rejected'}
        self.uploads.append(record)
        try:
            if tmp is None:
                raise PveError(400, 'Parameter verification failed.', {'filename': 'missing file upload'})
            if content == 'import':
                if not SAFE_IMPORT_NAME.match(filename):
                    raise PveError(400, 'Parameter verification failed.',
                                   {'filename': 'invalid filename or wrong extension'})
            elif content not in ('iso', 'vztmpl'):
                raise PveError(400, 'Parameter verification failed.',
                               {'content': "upload content type '{0}' not allowed".format(content)})
            self._need_file_storage(store, "can't upload to storage type '{0}'")
            if content not in split_list(store.get('content')):
                raise PveError(500, "storage '{0}' does not support '{1}' content".format(name, content))
        except PveError:
            self._drop(tmp)
            raise
        checksum = fields.get('checksum')
        algo = fields.get('checksum-algorithm')
        digest = hasher.hexdigest() if hasher else None

        async def body():
            return self._finish_import(name, filename, content, tmp, checksum, algo, digest, record, log)
        log = ['starting file import from: {0}'.format(tmp), 'target node: {0}'.format(node)]
        self.uploaded = {k: v for k, v in fields.items() if k != 'data'}
        from fakepve.server import ok
        return ok(await self.task(node, 'imgcopy', '', user, body, log=log))

    def _finish_import(self, name, filename, content, tmp, checksum, algo, digest, record, log):
        """The worker part of upload and download-url: checksum, image checks, store; the temp file always goes."""
        try:
            if checksum:
                if algo not in HASHES:
                    raise TaskError("unsupported checksum algorithm '{0}'".format(algo))
                if digest is None:
                    digest = self._hash_file(tmp, algo)
                if digest.lower() != checksum.lower():
                    log.append("ERROR, checksum mismatch: got '{0}' != expect '{1}'".format(digest, checksum))
                    raise TaskError('checksum mismatch')
                log.append('OK, checksum verified')
            size = os.path.getsize(tmp)
            if content == 'import':
                vsize, err = inspect_image(tmp, filename)
                if err:
                    raise TaskError(err)
            else:
                vsize = size
            self.store_file(name, filename, size, content)
            vol = self.storages[name]['volumes']['{0}/{1}'.format(content, filename)]
            vol['virtual_size'] = vsize
            if content == 'iso':
                self._keep_iso(name, filename, tmp)
            log.append('target file: /var/lib/vz/{0}/{1}'.format(content, filename))
            record['status'] = 'stored'
        except TaskError:
            record['status'] = 'failed'
            raise
        finally:
            self._drop(tmp)

    # ------------------------------------------------------- kept ISOs

    def iso_path(self, storage, filename):
        """Where the bytes of ISO volume `storage:iso/filename` are kept."""
        return os.path.join(self.workdir, 'isos', storage, filename)

    def _keep_iso(self, storage, filename, tmp):
        """Moves an imported ISO's temp file to iso_path (the caller's _drop then finds nothing)."""
        if os.sep in filename or filename in ('', '.', '..') or os.sep in storage:
            return
        dest = self.iso_path(storage, filename)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.replace(tmp, dest)

    def _sweep_isos(self):
        """Deletes kept ISOs whose volume is gone (content-delete, storage removed)."""
        top = os.path.join(self.workdir, 'isos')
        if not os.path.isdir(top):
            return
        for sid in os.listdir(top):
            store = self.storages.get(sid)
            for filename in os.listdir(os.path.join(top, sid)):
                if store is None or 'iso/' + filename not in store.get('volumes', {}):
                    self._drop(os.path.join(top, sid, filename))

    async def task(self, node, ttype, tid, user, body, vm=None, lock=True, log=()):
        took = self.task_secs.get(ttype) if hasattr(self, 'task_secs') else None
        if took:
            work = body

            async def body():
                await self.pause(took)
                return await work()
        if ttype == 'imgdel':
            inner = body

            async def body():
                try:
                    return await inner()
                finally:
                    self._sweep_isos()
        if ttype == 'qmclone' and vm is not None:
            body = self._clone_worker(vm, body)  # see "clone ids, pools"
        return await super().task(node, ttype, tid, user, body, vm=vm, lock=lock, log=log)

    @staticmethod
    def _hash_file(path, algo):
        h = hashlib.new(HASHES[algo])
        with open(path, 'rb') as fh:
            for chunk in iter(lambda: fh.read(CHUNK), b''):
                h.update(chunk)
        return h.hexdigest()

    @staticmethod
    def _drop(path):
        if path:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    async def _download_url(self, request):
        from fakepve.server import USER, ok, params
        node = request.match_info['node']
        name, store = self._file_storage(request, 'download')
        user = request[USER]
        self.require(user, '/storage/' + name, 'Datastore.AllocateTemplate')
        p = self._verify(request, await params(request))
        self._need_file_storage(store, "can't upload to storage type '{0}', not a file based storage!")
        content, filename = p['content'], normalize_content_filename(p['filename'])
        if content == 'import' and not SAFE_IMPORT_NAME.match(filename):
            raise PveError(400, 'Parameter verification failed.', {'filename': 'invalid filename or wrong extension'})
        if content not in split_list(store.get('content')):
            raise PveError(500, "storage '{0}' is not configured for content-type '{1}'".format(name, content))
        verify = str(p.get('verify-certificates', 1)) not in ('0', 'false')
        record = {'filename': filename, 'sent_filename': p['filename'], 'bytes': 0, 'storage': name, 'node': node,
                  'status': 'downloading'}
        self.uploads.append(record)
        log = ['downloading {0} to {1}'.format(p['url'], filename)]

        async def body():
            fd, tmp = tempfile.mkstemp(prefix='download-', dir=self.workdir)
            try:
                async with aiohttp.ClientSession() as session:
                    async with session.get(p['url'], ssl=None if verify else False) as resp:
                        if resp.status != 200:
                            raise TaskError('download failed: {0} {1}'.format(resp.status, resp.reason))
                        with os.fdopen(fd, 'wb') as out:
                            async for chunk in resp.content.iter_chunked(CHUNK):
                                record['bytes'] += len(chunk)
                                out.write(chunk)
            except aiohttp.ClientError as e:
                self._drop(tmp)
                raise TaskError('download failed: {0}'.format(e)) from None
            return self._finish_import(name, filename, content, tmp, p.get('checksum'),
                                       p.get('checksum-algorithm'), None, record, log)
        return ok(await self.task(node, 'download', name, user, body, log=log))

    # ------------------------------------------------------- import-from

    def _qm_new_drive(self, vmid, key, value, default):
        volume, props = split_drive(value)
        source = props.get('import-from')
        found = NEW_DISK.match(volume)
        if not source or not found:
            return super()._qm_new_drive(vmid, key, value, default)
        sid, volname = volume_ref(source)
        vol = self._volumes(sid).get(volname) if sid in self.storages else None
        if vol is None:
            # qemu-server src/PVE/API2/Qemu.pm `$import_from_volid`, in the create worker: the
            # task fails with "unable to create VM N - could not get size of VOLID".
            raise TaskError('could not get size of {0}'.format(source))
        vsize = int(vol.get('virtual_size') or vol.get('size') or 0)
        props = dict(props)
        props.pop('import-from')
        volid, _fmt = self._qm_alloc(found.group(1) or default, vmid, props.pop('format', None), vsize)
        props['size'] = format_size(vsize)
        return join_drive(volid, props), [volid]

    # ------------------------------------------------- linked clone names

    def _qm_alloc(self, sid, vmid, fmt, size, linked_from=None):
        """vdisk_alloc, and vdisk_clone for a linked clone (`linked_from` = '<basevmid>/<base>').

        pve-storage names a linked clone per plugin (`clone_image`): src/PVE/Storage/Plugin.pm (dir,
        NFS, CIFS, qcow2 on BTRFS) `<basevmid>/<base>/<vmid>/<name>`, ZFSPoolPlugin.pm and
        RBDPlugin.pm `<base>/<name>`, LvmThinPlugin.pm a plain `vm-<vmid>-disk-N` (a thin snapshot
        whose origin only LVM knows). fakepve names file-storage and LVM-thin clones so already; the
        ZFS and RBD ones it names like LVM-thin, so we rename those.
        """
        volid, fmt = super()._qm_alloc(sid, vmid, fmt, size, linked_from=linked_from)
        store = self.storages.get(sid) or {}
        if linked_from and '/' in linked_from and store.get('type') in ('rbd', 'zfspool'):
            base = linked_from.split('/', 1)[1]
            name = volume_ref(volid)[1]
            volumes = store.setdefault('volumes', {})
            if name in volumes and '/' not in name:
                renamed = '{0}/{1}'.format(base, name)
                volumes[renamed] = volumes.pop(name)
                volid = '{0}:{1}'.format(sid, renamed)
        return volid, fmt

    # --------------------------------------------------- clone ids, pools

    async def _qm_clone(self, v, user):
        """The request part of qemu-server PVE/API2/Qemu.pm `clone_vm`: `$load_and_check` looks for
        `config_file($newid)` on the node it runs on only (`-f $conffile`), so an id held on another
        node passes the request (see _qm_taken)."""
        token = _CLONE_NODE.set(v['node'])
        try:
            return await super()._qm_clone(v, user)
        finally:
            _CLONE_NODE.reset(token)

    def _qm_taken(self, vmid):
        node = _CLONE_NODE.get()
        if node is None:
            return super()._qm_taken(vmid)
        vm = self.vm(vmid)
        return vm is not None and vm.node == node

    def _clone_worker(self, new, body):
        """The worker part of `clone_vm`: the new VM enters the cluster's VM list only here.

        fakepve registers a clone in the request. PVE forks a worker (`fork_worker('qmclone', …)`)
        that takes the source's and the new id's config locks (`lock_config_full($newid, 1, …)`),
        runs `$load_and_check` again ("unable to create VM N: config file already exists") and then
        writes the temporary config "# qmclone temporary file" with `file_set_contents`, which
        pmxcfs refuses when another node holds the id (pve-cluster src/pmxcfs/memdb.c
        `memdb_rename`: `vmlist_different_vm_exists` → EEXIST; pve-common src/PVE/File.pm
        `file_set_contents`: "close (rename) atomic file '…' failed: File exists"). Until then
        `GET /cluster/nextid` (pve-manager PVE/API2/Cluster.pm `nextid`, reading
        `PVE::Cluster::get_vmlist()`) hands the id out again. `task-secs` {"qmclone-worker": S}
        sets how many PVE seconds pass between the POST and the worker writing the config.
        """
        if new in self.vms:
            self.vms.remove(new)
        node = new.node

        async def worker():
            await self.pause(getattr(self, 'task_secs', {}).get('qmclone-worker', 0))
            other = self.guest(new.vmid)
            if other is not None and other is not new:
                if getattr(other, 'guest', '').startswith('lxc/') or other.node != node:
                    raise TaskError("close (rename) atomic file '/etc/pve/nodes/{0}/qemu-server/{1}.conf' "
                                    "failed: File exists".format(node, new.vmid))
                raise TaskError('unable to create VM {0}: config file already exists'.format(new.vmid))
            self.vms.append(new)
            return await body()
        return worker

    async def _pool_create(self, v, user):
        """pve-manager PVE/API2/Pool.pm `create_pool`: the method's `check => ['perm', '/pool/{poolid}',
        ['Pool.Allocate']]` runs before its code, which alone says "pool '…' already exists"."""
        self.require(user, '/pool/' + v['poolid'], 'Pool.Allocate')
        return await super()._pool_create(v, user)

    # ------------------------------------------------------------ view

    def view(self):
        self._sweep_isos()
        vms = [{'vmid': vm.vmid, 'name': vm.name, 'node': vm.node, 'template': bool(vm.template),
                'status': vm.status, 'lock': vm.lock, 'tags': vm.config.get('tags', ''),
                'description': vm.config.get('description', ''),
                'config': {k: str(v) for k, v in vm.config.items()},
                'agent': vm.agent is not None, 'agent_hangs': bool(vm.agent_hangs)} for vm in self.vms]
        volumes = []
        for sid in sorted(self.storages):
            for volname, vol in sorted(self.storages[sid].get('volumes', {}).items()):
                path = None
                if volname.startswith('iso/') and os.path.isfile(self.iso_path(sid, volname[4:])):
                    path = self.iso_path(sid, volname[4:])
                volumes.append({'volid': '{0}:{1}'.format(sid, volname), 'content': vol.get('content'),
                                'size': int(vol.get('size') or 0), 'vmid': vol.get('vmid'), 'path': path})
        tasks = [{'upid': t['upid'], 'type': t['type'], 'node': t['node'], 'status': t['status'],
                  'exitstatus': t.get('exitstatus')} for t in self.tasklog]
        return {'vms': vms, 'volumes': volumes, 'tasks': tasks, 'uploads': self.uploads,
                'nodes': {n: s.get('online', True) for n, s in self.nodes.items()},
                'requests': [[m, p] for m, p, _b in self.requests], 'pools': sorted(self.pools)}


async def main(args):
    workdir = tempfile.mkdtemp(prefix='fakepve-harness-')
    ca_file, cert_file, key_file, fingerprint = make_pki(workdir)
    pve = ImagectlPve(workdir, host='127.0.0.1', port=0)
    pve.time_scale = args.time_scale
    for node in ('pve2', 'pve3'):
        pve.add_node(node)
    pve.add_ceph_storage('ceph-vm')
    token_id, secret = 'imagectl@pve!ci', secrets.token_hex(16)
    pve.apitokens[token_id] = secret
    await pve.start(cert_file, key_file)
    runner = web.AppRunner(control_app(pve))
    await runner.setup()
    site = web.TCPSite(runner, '127.0.0.1', 0)
    await site.start()
    control_port = runner.addresses[0][1]
    print(json.dumps({'port': pve.port, 'control_port': control_port, 'fingerprint': fingerprint,
                      'ca_file': ca_file, 'token': '{0}={1}'.format(token_id, secret), 'workdir': workdir}),
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def watch_stdin():
        # The Rust side holds our stdin; EOF means it went away.
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stop.set)
    threading.Thread(target=watch_stdin, daemon=True).start()
    await stop.wait()
    await runner.cleanup()
    await pve.stop()
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--time-scale', type=float, default=0.0,
                        help='real seconds per PVE second; 0 finishes tasks before the request returns')
    asyncio.run(main(parser.parse_args()))
