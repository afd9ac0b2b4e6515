# session 32, call 2: the 10-seed LM jobs run at 3.9-7.7 steps/s beside MQAR (10,000 steps would
# take 22-43 min): stop launch 1 (its scheduler and jobs) so the MQAR jobs have the GPU; wait on them
for p in $(pgrep -f run_device.sh); do [ "$(readlink /proc/$p/cwd)" = /tmp/protobg/tree1 ] && kill $p; done
sleep 1; pkill -f "protocol=lm_mixers"; sleep 5
ls /tmp/protobg/; cat /tmp/protobg/logs/*.mem 2>/dev/null | tr '\n' ' '; echo
bash .whl/cw.sh
