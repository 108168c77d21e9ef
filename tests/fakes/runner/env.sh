#!/bin/bash
# Fake env.sh (reference section 2.1): sourced from the runner root by config.sh.
# Appends to .env the variables below that are set and not in .env yet, and writes the
# current PATH to .path.

fake_env_vars="LANG JAVA_HOME ANT_HOME M2_HOME ANDROID_HOME ANDROID_SDK_ROOT GRADLE_HOME NVM_BIN NVM_PATH LD_LIBRARY_PATH PERL5LIB"

[ -f .env ] || : > .env
for fake_env_name in $fake_env_vars; do
    if grep -q "^${fake_env_name}=" .env; then
        continue
    fi
    if [ -n "${!fake_env_name}" ]; then
        printf '%s=%s\n' "$fake_env_name" "${!fake_env_name}" >> .env
    fi
done
printf '%s\n' "$PATH" > .path
unset fake_env_vars fake_env_name
