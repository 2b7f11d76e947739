"""The HTTP routes, one router per area. Each module's `router(...)` builds a fresh `APIRouter` for one app
(score and events take the request model sized by the app's config); `service.app.create_app` includes them.
Handlers get the app's `Runtime` through the `RuntimeDep` dependency, never from module state."""
