// Test tooling only: MetalLB, built to be measured beside ferrolb. Nothing here ships.
//
// v0.15.2 is the newest release that builds from the module proxy: v0.16.2 requires
// github.com/metallb/frr-k8s v0.0.27, whose source the proxy refuses to serve.
// go.sum holds the sums of everything the controller and speaker packages need (made
// with `go list -mod=mod -deps go.universe.tf/metallb/controller go.universe.tf/metallb/speaker`);
// `go mod tidy` would keep only those of tools.go.
module github.com/ferrolb/ferrolb/tests/metallb

go 1.26.0

require go.universe.tf/metallb v0.15.2

require (
	github.com/fxamacker/cbor/v2 v2.8.0 // indirect
	github.com/go-logr/logr v1.4.2 // indirect
	github.com/gogo/protobuf v1.3.2 // indirect
	github.com/json-iterator/go v1.1.12 // indirect
	github.com/kr/text v0.2.0 // indirect
	github.com/modern-go/concurrent v0.0.0-20180306012644-bacd9c7ef1dd // indirect
	github.com/modern-go/reflect2 v1.0.2 // indirect
	github.com/x448/float16 v0.8.4 // indirect
	golang.org/x/net v0.39.0 // indirect
	golang.org/x/text v0.24.0 // indirect
	gopkg.in/inf.v0 v0.9.1 // indirect
	k8s.io/api v0.33.0 // indirect
	k8s.io/apimachinery v0.33.0 // indirect
	k8s.io/klog/v2 v2.130.1 // indirect
	k8s.io/utils v0.0.0-20250321185631-1f6e0b77f77e // indirect
	sigs.k8s.io/controller-runtime v0.20.4 // indirect
	sigs.k8s.io/json v0.0.0-20241014173422-cfa47c3a1cc8 // indirect
	sigs.k8s.io/randfill v1.0.0 // indirect
	sigs.k8s.io/structured-merge-diff/v4 v4.7.0 // indirect
	sigs.k8s.io/yaml v1.4.0 // indirect
)
