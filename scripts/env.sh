# Sourced by the test and demo scripts: the AWS SDK gets static test
# credentials, a region and no metadata probing; the engine gets the
# loopback-only guard. Nothing here can reach real AWS.
unset AWS_PROFILE AWS_DEFAULT_PROFILE AWS_SESSION_TOKEN AWS_ENDPOINT_URL AWS_ENDPOINT_URL_EC2 AWS_CONFIG_FILE AWS_SHARED_CREDENTIALS_FILE
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true
export AWS_CONFIG_FILE=/dev/null
export AWS_SHARED_CREDENTIALS_FILE=/dev/null
export ACODE_EC2_LOOPBACK_ONLY=1

# Runs "$@" in a new network namespace that has only loopback, when the
# kernel allows it; says so either way.
in_loopback_namespace() {
    if [ -z "${ACODE_EC2_NO_NETNS:-}" ] && unshare -n true 2>/dev/null; then
        echo "network: running inside a loopback-only network namespace (unshare -n)" >&2
        unshare -n -- sh -c 'ip link set lo up && exec "$@"' sh "$@"
    else
        echo "network: network namespaces are not available here; relying on the loopback guard (ACODE_EC2_LOOPBACK_ONLY=1)" >&2
        "$@"
    fi
}
