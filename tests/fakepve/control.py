"""The harness's loopback control channel (`POST /<cmd>`, `GET /state`); see harness.py for the
commands. Test-only, bound to 127.0.0.1."""


from aiohttp import web


def control_app(pve):
    """The loopback control channel: JSON in, JSON out, no auth (test-only, bound to 127.0.0.1)."""
    async def state(_request):
        return web.json_response(pve.view())

    async def command(request):
        cmd = request.match_info['cmd']
        a = await request.json() if request.can_read_body else {}
        try:
            if cmd == 'fail':
                pve.fail(a['method'], a['suffix'], status=a.get('status'), message=a.get('message'),
                         error=a.get('error'), times=a.get('times'))
            elif cmd == 'fail-task':
                pve.task_failures[(a['method'], a['suffix'])] = {'message': a['message'], 'times': a.get('times'),
                                                                 'delay': float(a.get('delay') or 0)}
            elif cmd == 'clear-failures':
                pve.failures.clear()
                pve.task_failures.clear()
            elif cmd == 'node':
                if a['name'] not in pve.nodes:
                    pve.add_node(a['name'])
                pve.set_node_offline(a['name'], not a.get('online', True))
            elif cmd == 'storage':
                store = pve.storages.setdefault(a['name'], {'type': a.get('type', 'dir'), 'active': 1,
                                                            'files': set(), 'path': '/mnt/pve/' + a['name']})
                for k in ('content', 'shared', 'avail', 'type', 'vgname', 'thinpool', 'nodes'):
                    if k in a:
                        store[k] = a[k]
            elif cmd == 'token':
                if a.get('remove'):
                    pve.apitokens.pop(a['id'], None)
                else:
                    pve.apitokens[a['id']] = a['secret']
            elif cmd == 'vm':
                vm = pve.add_vm(int(a['vmid']), a['name'], node=a.get('node', 'pve1'),
                                status=a.get('status', 'stopped'), config=a.get('config', {}),
                                template=a.get('template', False), lock=a.get('lock'))
                if vm.template:
                    vm.config['template'] = 1
            elif cmd == 'agent':
                vm = pve.vm(int(a['vmid']))
                if vm is None:
                    return web.json_response({'error': 'no VM {0}'.format(a['vmid'])}, status=404)
                files = a.get('files')
                if files is not None and not isinstance(files, dict):
                    raise TypeError('files must be an object or null')
                # The emulated guest's only address is loopback, so whatever the host then probes
                # (node_exporter, cAdvisor, gitlab-runner metrics) stays on this machine.
                vm.agent = None if files is None else {
                    'files': {str(k): str(v) for k, v in files.items()},
                    'interfaces': [{'name': 'eth0', 'hardware-address': 'bc:24:11:00:00:01',
                                    'ip-addresses': [{'ip-address': '127.0.0.1', 'ip-address-type': 'ipv4',
                                                      'prefix': 8}]}]}
                vm.agent_hangs = bool(a.get('hangs', False))
            elif cmd == 'version':
                # What GET /version reports (pve-manager PVE/API2/Version.pm: version, release).
                pve.version = str(a['version'])
                pve.release_version = '.'.join(pve.version.split('.')[:2])
            elif cmd == 'grant':
                # An ACL entry for a user or token (pveum acl modify PATH --privs ... ); the first
                # grant switches fakepve from "everyone may do everything" to ACL checks.
                pve.grant(a['user'], a['path'], *a['privs'])
            elif cmd == 'task-secs':
                # PVE seconds each task type takes (scaled by the time scale), e.g. {"qmclone": 3}.
                pve.task_secs = {str(k): float(v) for k, v in a.items()}
            elif cmd == 'time-scale':
                pve.time_scale = float(a['value'])
            else:
                return web.json_response({'error': 'unknown command ' + cmd}, status=404)
        except (KeyError, ValueError, TypeError) as e:
            return web.json_response({'error': repr(e)}, status=400)
        return web.json_response({'ok': True})

    app = web.Application()
    app.router.add_get('/state', state)
    app.router.add_post('/{cmd}', command)
    return app
