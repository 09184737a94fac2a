//go:build tools

// Test tooling only: MetalLB's controller and speaker, built from the published
// go.universe.tf/metallb module so that the comparison benchmark runs them beside ferrolb.
// Their main packages cannot be imported; this keeps the module in go.mod, and `build`
// compiles go.universe.tf/metallb/controller and go.universe.tf/metallb/speaker.
package tools

import _ "go.universe.tf/metallb/api/v1beta1"
