#!/usr/bin/env bash
# stowd quick start on a fresh Debian/Ubuntu machine, from a clone of the repository:
#
#     sudo bash demo/quickstart.sh [--keep]
#
# Installs orthanc, orthanc-dicomweb, dcmtk and python3-venv (apt), makes .venv with stowd
# in it, starts a local Orthanc (DICOMweb) on a free 127.0.0.1 port, starts `stowd run` on a
# drop folder and a DICOM C-STORE receiver, drops a few generated files into the folder and
# sends a few more with dcmtk's storescu, and shows them arrive in Orthanc (good files) or
# in the failed folder (the bad one).  Everything lives in ./demo-run/.  On exit stowd and
# Orthanc are stopped, unless --keep is given.
set -euo pipefail

usage() {
    sed -n '2,11s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

keep=0
for arg in "$@"; do
    case "${arg}" in
        --keep) keep=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "unknown argument: ${arg}" >&2
            usage >&2
            exit 2
            ;;
    esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
run_dir="${repo}/demo-run"
cd "${repo}"

say() {
    printf '\n==> %s\n' "$*"
}

die() {
    printf 'quickstart: %s\n' "$*" >&2
    exit 1
}

# Under sudo, run everything but apt-get as the user who called sudo, so that .venv and
# demo-run/ in their clone belong to them.  setpriv execs the command itself (no extra
# process, no pty), so the pids below are the real stowd and Orthanc processes.
run_user=""
if [[ ${EUID} -eq 0 && -n ${SUDO_USER:-} && ${SUDO_USER} != root ]] &&
    [[ "$(stat -c %U "${repo}")" == "${SUDO_USER}" ]] && command -v setpriv >/dev/null; then
    run_user="${SUDO_USER}"
    run_home="$(getent passwd "${run_user}" | cut -d: -f6)"
fi
as_user() {
    if [[ -n ${run_user} ]]; then
        setpriv --reuid="${run_user}" --regid="$(id -g "${run_user}")" --init-groups \
            env HOME="${run_home}" USER="${run_user}" LOGNAME="${run_user}" "$@"
    else
        "$@"
    fi
}
# For `exec_as_user CMD &`: the background subshell becomes CMD, so $! is CMD's own pid.
exec_as_user() {
    if [[ -n ${run_user} ]]; then
        exec setpriv --reuid="${run_user}" --regid="$(id -g "${run_user}")" --init-groups \
            env HOME="${run_home}" USER="${run_user}" LOGNAME="${run_user}" "$@"
    else
        exec "$@"
    fi
}

pid_alive() {
    [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null
}

# --- a previous run ------------------------------------------------------------------------
for pid_file in "${run_dir}/stowd.pid" "${run_dir}/orthanc.pid"; do
    if [[ -f ${pid_file} ]] && pid_alive "$(cat "${pid_file}")"; then
        die "a previous demo (started with --keep) still runs: stop it with
    kill $(cat "${run_dir}/stowd.pid" 2>/dev/null) $(cat "${run_dir}/orthanc.pid" 2>/dev/null)
then run this script again."
    fi
done

# --- system packages -----------------------------------------------------------------------
say "System packages: orthanc orthanc-dicomweb dcmtk python3-venv"
packages=(orthanc orthanc-dicomweb dcmtk python3-venv)
missing=()
for package in "${packages[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "${package}" 2>/dev/null || true)"
    [[ ${status} == "install ok installed" ]] || missing+=("${package}")
done
if ((${#missing[@]} > 0)); then
    [[ ${EUID} -eq 0 ]] || die "missing packages: ${missing[*]}; run: sudo bash demo/quickstart.sh"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${packages[@]}"
    echo "(the orthanc package may also run a system Orthanc on port 8042; this demo uses its own)"
else
    echo "already installed"
fi

# --- Python environment --------------------------------------------------------------------
say "Python environment: .venv with stowd"
if [[ ! -x .venv/bin/python ]]; then
    as_user python3 -m venv .venv
fi
as_user .venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
as_user .venv/bin/stowd --help >/dev/null || die "stowd is not runnable from .venv"

# --- demo folder ---------------------------------------------------------------------------
rm -rf "${run_dir}"
as_user mkdir -p "${run_dir}/drop" "${run_dir}/done/sent" "${run_dir}/done/failed" \
    "${run_dir}/state" "${run_dir}/samples"

orthanc_pid=""
stowd_pid=""
stop_all() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n ${run_user} && -d ${run_dir} ]]; then
        chown -R "${run_user}:" "${run_dir}" 2>/dev/null || true  # our logs and pid files
    fi
    if ((keep)); then
        if pid_alive "${stowd_pid}" || pid_alive "${orthanc_pid}"; then
            say "Left running (--keep)"
            echo "stowd   pid ${stowd_pid:-?}  log ${run_dir}/stowd.log"
            echo "Orthanc pid ${orthanc_pid:-?}  ${orthanc_url:-}  log ${run_dir}/orthanc/orthanc.log"
            echo "stop both with: kill ${stowd_pid} ${orthanc_pid}"
        fi
        exit "${status}"
    fi
    local pid
    for pid in "${stowd_pid}" "${orthanc_pid}"; do
        if pid_alive "${pid}"; then
            kill -TERM "${pid}" 2>/dev/null || true
            for _ in $(seq 1 60); do
                pid_alive "${pid}" || break
                sleep 0.5
            done
            pid_alive "${pid}" && kill -KILL "${pid}" 2>/dev/null
            wait "${pid}" 2>/dev/null || true
        fi
    done
    rm -f "${run_dir}/stowd.pid" "${run_dir}/orthanc.pid"
    echo "stowd and Orthanc stopped (files and logs kept in ${run_dir})"
    exit "${status}"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- Orthanc -------------------------------------------------------------------------------
say "Starting Orthanc (DICOMweb) on a free 127.0.0.1 port"
exec_as_user .venv/bin/python tests/support/orthanc.py --dir "${run_dir}/orthanc" \
    --ready-file "${run_dir}/orthanc.url" >"${run_dir}/orthanc-console.log" 2>&1 &
orthanc_pid=$!
echo "${orthanc_pid}" >"${run_dir}/orthanc.pid"
for _ in $(seq 1 300); do
    [[ -s "${run_dir}/orthanc.url" ]] && break
    pid_alive "${orthanc_pid}" || break
    sleep 0.1
done
if [[ ! -s "${run_dir}/orthanc.url" ]]; then
    cat "${run_dir}/orthanc-console.log" >&2
    die "Orthanc did not start"
fi
orthanc_url="$(cat "${run_dir}/orthanc.url")"
echo "Orthanc: ${orthanc_url}  (DICOMweb: ${orthanc_url}/dicom-web)"

# --- stowd ---------------------------------------------------------------------------------
config="${run_dir}/stowd.yaml"
# A free port from 1024 up for the C-STORE receiver (below 1024 needs CAP_NET_BIND_SERVICE).
dicom_port="$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
as_user tee "${config}" >/dev/null <<EOF
# Written by demo/quickstart.sh; relative paths are relative to this file's folder.
queue: ./state/queue.db
sources:
  - name: demo
    watch: ./drop
    sent: ./done/sent
    failed: ./done/failed
    destination: orthanc
  - name: modality  # receives DICOM C-STORE (docs/receiving.md) instead of watching a folder
    receive:
      ae_title: STOWD
      port: ${dicom_port}
      bind: 127.0.0.1
      allow: [{ae_title: DEMO_CT}]  # only this calling AE title may send
    sent: ./done/modality/sent
    failed: ./done/modality/failed
    destination: orthanc
destinations:
  orthanc:
    url: ${orthanc_url}/dicom-web
rules:  # metadata rules: every file gets these attributes before it is stored
  - name: demo institution
    set: {InstitutionName: stowd quick start}
  - name: photos and documents take the patient from their folder
    match: {type: [jpeg, pdf], regex: '^(?P<pid>[^/]+)/'}
    set: {PatientID: '{regex.pid}', PatientName: 'Demo^{regex.pid}'}
EOF
say "Starting: stowd run -c ${config#"${repo}"/}"
cat "${config}"
exec_as_user .venv/bin/stowd run -c "${config}" >"${run_dir}/stowd.log" 2>&1 &
stowd_pid=$!
echo "${stowd_pid}" >"${run_dir}/stowd.pid"
sleep 2
if ! pid_alive "${stowd_pid}"; then
    cat "${run_dir}/stowd.log" >&2
    die "stowd exited at once (log above)"
fi

# --- drop some files -----------------------------------------------------------------------
say "Dropping 8 generated DICOM files (2 studies), a photo and a PDF of patient DEMO3, and 1 broken file into demo-run/drop/"
as_user .venv/bin/python tests/support/dicomgen.py study "${run_dir}/samples/study-1" -n 5 \
    --patient-id DEMO1 >/dev/null
as_user .venv/bin/python tests/support/dicomgen.py study "${run_dir}/samples/study-2" -n 3 \
    --patient-id DEMO2 >/dev/null
as_user .venv/bin/python tests/support/dicomgen.py garbage "${run_dir}/samples/not-dicom.dcm" >/dev/null
as_user .venv/bin/python tests/support/mediagen.py jpeg "${run_dir}/samples/DEMO3/photo.jpg" >/dev/null
as_user .venv/bin/python tests/support/mediagen.py pdf "${run_dir}/samples/DEMO3/referral.pdf" >/dev/null
say "What a dropped photo becomes: stowd explain --source demo DEMO3/photo.jpg"
(cd "${run_dir}/samples" && as_user "${repo}/.venv/bin/stowd" explain -c "${config}" \
    --source demo DEMO3/photo.jpg) || true
say "What the rules do to one of them: stowd explain --source demo FILE"
as_user .venv/bin/stowd explain -c "${config}" --source demo \
    "${run_dir}/samples/study-1/IM00001.dcm" || true
as_user cp -R "${run_dir}/samples/." "${run_dir}/drop/"
expected_sent=10
expected_failed=1

# Files below a folder, leaving out stowd's *.error.json notes in failed/.
count_files() {
    find "$1" -type f ! -name '*.error.json' 2>/dev/null | wc -l
}

# Whether a wait loop should stop: stowd died (its log shown) or 60 s went by.
gave_up() {
    if ! pid_alive "${stowd_pid}"; then
        echo "stowd has exited; its log:" >&2
        tail -n 30 "${run_dir}/stowd.log" >&2
        return 0
    fi
    if (($1 >= 60)); then
        echo "not everything arrived within 60 s; see ${run_dir}/stowd.log"
        return 0
    fi
    return 1
}

orthanc_instances() {
    .venv/bin/python - "${orthanc_url}" <<'PY' 2>/dev/null || echo "?"
import sys, httpx
print(httpx.get(sys.argv[1] + "/statistics", timeout=5).json()["CountInstances"])
PY
}

say "Waiting up to 60 s for stowd (quiet period 5 s, then upload)"
printf '%6s  %6s  %6s  %8s  %18s\n' "time" "drop" "sent" "failed" "Orthanc instances"
start=${SECONDS}
while :; do
    elapsed=$((SECONDS - start))
    in_drop="$(count_files "${run_dir}/drop")"
    sent="$(count_files "${run_dir}/done/sent")"
    failed="$(count_files "${run_dir}/done/failed")"
    stored="$(orthanc_instances)"
    printf '%5ss  %6s  %6s  %8s  %18s\n' "${elapsed}" "${in_drop}" "${sent}" "${failed}" "${stored}"
    if ((sent >= expected_sent && failed >= expected_failed)) && [[ ${stored} == "${expected_sent}" ]]; then
        echo "all ${expected_sent} files are in Orthanc (the photo and the PDF as DICOM instances); the broken file is in done/failed"
        break
    fi
    if gave_up "${elapsed}"; then
        break
    fi
    sleep 3
done

for note in "${run_dir}"/done/failed/*.error.json; do
    [[ -f ${note} ]] || continue
    echo "failed: ${note#"${run_dir}"/}:"
    cat "${note}"
    echo
done

# --- C-STORE -------------------------------------------------------------------------------
say "Sending 4 DICOM files of patient DEMO4 with C-STORE: dcmtk's storescu as DEMO_CT to STOWD at 127.0.0.1:${dicom_port}"
as_user .venv/bin/python tests/support/dicomgen.py study "${run_dir}/modality" -n 4 \
    --patient-id DEMO4 >/dev/null
echo "$ echoscu -aet DEMO_CT -aec STOWD 127.0.0.1 ${dicom_port}"
echo_ok=0
for _ in $(seq 1 20); do  # stowd listens within a second or two of its start
    if echoscu -aet DEMO_CT -aec STOWD 127.0.0.1 "${dicom_port}" 2>/dev/null; then
        echo_ok=1
        break
    fi
    sleep 0.5
done
((echo_ok)) || die "stowd does not answer C-ECHO on 127.0.0.1:${dicom_port}; see ${run_dir}/stowd.log"
echo "C-ECHO answered: Success"
echo "$ storescu -v -aet DEMO_CT -aec STOWD 127.0.0.1 ${dicom_port} demo-run/modality/*.dcm"
if ! storescu -v -aet DEMO_CT -aec STOWD 127.0.0.1 "${dicom_port}" "${run_dir}"/modality/*.dcm \
    >"${run_dir}/storescu.log" 2>&1; then
    cat "${run_dir}/storescu.log" >&2
    die "storescu failed (its output above; stowd's log: ${run_dir}/stowd.log)"
fi
grep -E 'Sending file|Store Response' "${run_dir}/storescu.log" | sed "s#${run_dir}/#demo-run/#"
echo "$ storescu -aet UNKNOWN -aec STOWD 127.0.0.1 ${dicom_port} ...   (a calling AE title not in allow)"
storescu -aet UNKNOWN -aec STOWD 127.0.0.1 "${dicom_port}" "${run_dir}/modality/IM00001.dcm" 2>&1 |
    grep -E 'Association Rejected|Result|Reason' || true

expected_received=4
expected_stored=$((expected_sent + expected_received))
say "Waiting up to 60 s for the received files to reach Orthanc"
printf '%6s  %14s  %18s\n' "time" "modality sent" "Orthanc instances"
start=${SECONDS}
while :; do
    elapsed=$((SECONDS - start))
    sent="$(count_files "${run_dir}/done/modality/sent")"
    stored="$(orthanc_instances)"
    printf '%5ss  %14s  %18s\n' "${elapsed}" "${sent}" "${stored}"
    if ((sent >= expected_received)) && [[ ${stored} == "${expected_stored}" ]]; then
        echo "all ${expected_received} instances sent with C-STORE are in Orthanc and in done/modality/sent/"
        break
    fi
    if gave_up "${elapsed}"; then
        break
    fi
    sleep 1
done
grep -E 'stowd.receive' "${run_dir}/stowd.log" | sed -E 's/^[0-9-]+ ([0-9:]+),[0-9]+ /\1 /' || true

say "stowd status -c ${config#"${repo}"/}"
as_user .venv/bin/stowd status -c "${config}" || echo "(stowd status exited with $?)"

say "Done"
echo "stowd log:   ${run_dir}/stowd.log"
echo "Orthanc log: ${run_dir}/orthanc/orthanc.log   Orthanc Explorer: ${orthanc_url}/app/explorer.html"
if ((keep)); then
    echo "Drop more files into ${run_dir}/drop/ to see them uploaded, or send some:"
    echo "    storescu -aet DEMO_CT -aec STOWD 127.0.0.1 ${dicom_port} FILE.dcm"
fi
