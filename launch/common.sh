# Helpers shared by the launchers (sourced; sets nothing else). The caller sets `script` (its
# name, for messages) and `dry_run` (true: print commands instead of running them).

die() {
  echo "$script: error: $*" >&2
  exit 2
}

# Prints ARGS as one shell command that can be pasted back: values quoted where needed.
show() {
  local out="" arg flag
  for arg in "$@"; do
    flag=""
    [[ "$arg" =~ ^--[A-Za-z0-9_.-]+= ]] && flag="${BASH_REMATCH[0]}" && arg="${arg#"$flag"}"
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]*$ ]]; then
      out+="$flag$arg "
    else
      out+="$flag'${arg//\'/\'\\\'\'}' "
    fi
  done
  echo "${out% }"
}

run() {
  if $dry_run; then show "$@"; else "$@"; fi
}

# Dies unless the arguments for vggjax.main name a config and leave --workdir to the launcher.
check_train_args() {
  [[ " $* " == *" --config="* || " $* " == *" --config "* ]] \
    || die "no training command: add e.g. -- --config=configs/vgg16.py"
  [[ " $* " != *" --workdir="* && " $* " != *" --workdir "* ]] \
    || die "give --workdir before --, not after"
}
