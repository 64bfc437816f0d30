#pragma once
// Everything a program that runs images needs. Finer-grained headers are
// there for those who compose their own machine (machine.hpp, backend/,
// devices/, virtio/, storage/) or use one layer alone (oci/, snapshot/, boot/).
#include <supermachine/error.hpp>
#include <supermachine/image.hpp>
#include <supermachine/machine.hpp>
#include <supermachine/snapshot_image.hpp>
#include <supermachine/vm.hpp>
