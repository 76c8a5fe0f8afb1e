//! The cgroup and namespace scenarios on this host's kernel (v1/hybrid or v2, whichever it
//! runs). The same scenarios run in a pure cgroup v2 VM from `v2vm.rs`.

use corral_e2e::{scenarios, skip_unless_root};

macro_rules! scenario {
    ($name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            if skip_unless_root(stringify!($name)) {
                return;
            }
            scenarios::$name().await;
        }
    };
}

scenario!(limits_and_isolation);
scenario!(cpu_hog_is_throttled);
scenario!(instances_share_their_services_cpu_cgroup);
scenario!(memory_hog_is_oom_killed);
scenario!(kill9_is_signaled_not_oom);
scenario!(fork_bomb_stays_within_pids);
scenario!(delete_leaves_nothing);
scenario!(private_network_has_only_loopback);
scenario!(init_reaps_orphans);
scenario!(rolling_restart_keeps_serving);
scenario!(start_cpu_caps_a_rollouts_new_instance);
scenario!(cpu_weight_follows_the_instances);
scenario!(capabilities_as_configured);
scenario!(readonly_root_keeps_workdir_and_tmp_writable);
scenario!(nofile_limit_applies);
scenario!(a_second_agent_on_the_same_cgroup_tree_is_refused);
scenario!(image_is_the_instance_root);
scenario!(image_readonly_root);
scenario!(init_is_static_and_small);
scenario!(inits_come_from_the_zygote);
